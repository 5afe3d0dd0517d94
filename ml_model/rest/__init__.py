"""The REST layer of the API service: auth, DB access, model serving and the routers (see ml_model/api.py)."""
