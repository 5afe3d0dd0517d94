"""Why the server rejects a device's packets, in plain words, with what to do about it.

The one source of these texts: the web UI shows them next to a device's rejection counters (Gesture
Management page) and README.md ("Troubleshooting a device") lists them; tests check both cover every
rejection reason the server counts (`protocol.Reject` plus `internal_error`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from udpserver.protocol import Reject

INTERNAL_ERROR = "internal_error"  # counted by udpserver.udpserver when handling a packet raised

# reason -> "cause: remedy" (one line each)
REJECT_HINTS: dict[str, str] = {
    Reject.BAD_TAG: "the key on the device does not match (wrong key, or the key was rotated): flash the "
                    "device's current secrets (arduino_secrets.h); if they are lost, rotate the key and flash "
                    "the new ones",
    Reject.OLD_BOOT: "the device's boot counter went back (flash erased or board replaced), so its packets look "
                     "older than what was already received: after re-flashing it, reset its boot counter ('Reset boot "
                     "counter' on Gesture Management, or POST /devices/{id}/reset-boot) and flash the new key it "
                     "gives; a few right after a "
                     "restart are late packets and harmless",
    Reject.CHANNEL_MISMATCH: "the device sends a different number of channels than registered: list exactly the "
                             "registered number of pins in ANALOG_PINS in the sketch (the Myo bridge always sends "
                             "8), or register a new device with the number of channels it sends",
    Reject.PROTOCOL_MISMATCH: "the device sends binary packets but is registered for the legacy text protocol: "
                              "register a binary device and flash its secrets, or build the sketch with "
                              "SEMG_LEGACY_PROTOCOL 1",
    Reject.REPLAY: "packets repeat sequence numbers already received (two boards flashed with the same secrets, "
                   "duplicated packets, or a re-flash with its flash erased restarted the boot counter at the "
                   "boot last received): flash each board with its own device's secrets; after re-flashing a "
                   "binary device, reset its boot counter ('Reset boot counter' on Gesture Management, or POST "
                   "/devices/{id}/reset-boot) and flash the new key it gives; a few after a Wi-Fi hiccup are "
                   "harmless (duplicates, or a packet overtaken by a later one: its samples were counted lost "
                   "when the later one came, as sequence numbers only go forward)",
    Reject.TOO_FAST: "the device sends more samples per second than its registered rate allows (by default beyond "
                     "1.25 times it, after a 30 s allowance for bursts), so the excess is not stored: check that "
                     "SEMG_SAMPLE_RATE_HZ in the sketch is the rate the device is registered with (the Myo "
                     "bridge sends 200 Hz), or register a new device with the rate it sends; a simulator replaying faster than "
                     "real time needs a server started with --rate-tolerance 0",
    Reject.UNKNOWN_DEVICE: "a binary packet for a device id that is not registered (deleted, or a typo): flash the "
                           "secrets of a device registered on Gesture Management (SECRET_DEVICE_ID and its key; the Myo "
                           "bridge's --device-id and --key)",
    Reject.UNKNOWN_USER: "a text packet for a user without a legacy device: flash the binary sketch with a "
                         "registered device's secrets, or check SECRET_USER_ID",
    Reject.NOT_READY: "the server has not loaded the device list yet (PostgreSQL unreachable since it started): "
                      "start the database (./start_all.sh); packets are accepted once the list is loaded",
    Reject.EMPTY: "a zero-length datagram, which the sketch never sends: find the other program sending to "
                  "the UDP port",
    Reject.OVERSIZE: "a packet longer than allowed (8192 bytes binary, 256 text) or than its header says: send "
                     "fewer samples per packet (SAMPLES_PER_PACKET) or fix the sender",
    Reject.TRUNCATED: "a packet shorter than its header says (cut off): keep packets within one MTU (1472 "
                      "bytes: fewer samples per packet) and send whole packets",
    Reject.BAD_VERSION: "a binary packet of an unknown protocol version: flash the sketch from this "
                        "repository's arduino/ folder",
    Reject.BAD_HEADER: "a binary header out of range (channels not 1..16, rate not 1..10000, no samples, device "
                       "id 0): check ANALOG_PINS, SEMG_SAMPLE_RATE_HZ and SECRET_DEVICE_ID",
    Reject.MALFORMED: "neither a binary nor a text packet: something other than the sketch sends to the UDP "
                      "port; find it and point it elsewhere",
    Reject.BAD_FIELD_COUNT: "a text packet without 1..16 values: the legacy sender must send "
                            "userid,millis,v0,...,vN",
    Reject.NON_NUMERIC: "a text packet with a field that is not a plain integer: send integers only (no "
                        "spaces, decimals or '+')",
    Reject.OUT_OF_RANGE: "a text packet with a user id below 1, millis beyond 32 bits or a value outside "
                         "-32768..32767: check SECRET_USER_ID and the values sent",
    INTERNAL_ERROR: "the server failed on a packet (a bug, logged with its traceback): report it with the UDP "
                    "server's log",
}
REJECT_HINTS = {str(k): v for k, v in REJECT_HINTS.items()}

# The reasons the server counts per device (GET /metrics -> devices -> <id> -> rejected); the others are
# rejected before a packet can be tied to a registered device.
DEVICE_REASONS = (Reject.BAD_TAG, Reject.OLD_BOOT, Reject.CHANNEL_MISMATCH, Reject.PROTOCOL_MISMATCH,
                  Reject.REPLAY, Reject.TOO_FAST)

# When nothing arrives under a device's id (no packet accepted, none rejected).
SILENT_HINT = ("no packet reaches the server under this device's id: check on the device's serial monitor "
               "(115200 baud) that it joins the Wi-Fi and sends to this server's address (SECRET_SERVER_IP) and "
               "UDP port (SECRET_SERVER_PORT), that the platform listens where the device can reach it "
               "(it listens on 127.0.0.1 by default, which only this computer reaches: start it with "
               "SEMG_UDP_BIND_HOST=0.0.0.0, which opens the UDP port alone), that no firewall drops UDP, "
               "and that "
               "SECRET_DEVICE_ID (the Myo bridge's --device-id) is this device's id (packets under an "
               "unregistered id count as unknown_device)")
# When a binary device's packets say another rate (rate_hz) than it is registered with. Not a rejection: a device
# sending slower than registered harms nobody else (PROTOCOL.md), but its own recordings are on the wrong time scale.
RATE_HINT = ("its samples are stored, but training and live recognition take them at the registered rate, so "
             "their windows and filters are on the wrong time scale: set SEMG_SAMPLE_RATE_HZ in arduino_secrets.h to "
             "the registered rate (the snippet Gesture Management gives does), or register a new device with the "
             "rate it sends")
# When a device that was sending has stopped: its settings were right, so what changed is power, Wi-Fi or the device.
STOPPED_HINT = ("it was sending and has stopped, so its settings were right: check that it is powered and in reach of "
                "the Wi-Fi; its serial monitor (115200 baud) says whether it lost the Wi-Fi or restarted")


def hint(reason: str) -> str:
    """The hint of a reason; a reason this module does not know yet still gets a pointer."""
    return REJECT_HINTS.get(reason, "see udpserver/PROTOCOL.md, 'Rejection reasons'")


def sensor_address(bind_host: str) -> str | None:
    """The address a board on the network sends its packets to (SECRET_SERVER_IP), given where the UDP port
    listens (Settings.udp_bind_host): that address when it is one of the network's; for 0.0.0.0 / :: this
    machine's address on its default route (a UDP socket's connect sends nothing); None when the port listens on
    loopback only (no board can reach it) or no address is found."""
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        return None  # a host name: the maker knows it better than we do
    if ip.is_loopback:
        return None
    if not ip.is_unspecified:
        return str(ip)
    family, probe = (socket.AF_INET6, "2001:db8::1") if ip.version == 6 else (socket.AF_INET, "192.0.2.1")
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((probe, 9))
        found = ipaddress.ip_address(s.getsockname()[0])
        if not (found.is_loopback or found.is_unspecified):
            return str(found)
    return None


def listens_on_loopback_only(bind_host: str) -> bool:
    """True when the UDP port listens where no board can reach it (127.0.0.1, the default)."""
    try:
        return ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        return bind_host == "localhost"
