"""Simulators and synthetic data for developing and testing the platform without hardware."""
