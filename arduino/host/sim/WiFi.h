#pragma once
#include "Arduino.h"
#define WL_IDLE_STATUS 0
#define WL_CONNECTED 3
#define WL_DISCONNECTED 6
#define WIFI_STA 1
/* Host: the access point is "in range" while $SIM_WIFI_FILE exists (sim.cpp). */
class WiFiClass {
  public:
    int status();
    int begin(const char *ssid, const char *pass);
    bool disconnect();
    bool mode(int m);
    bool setAutoReconnect(bool on);
    int RSSI();
    IPAddress localIP();
};
extern WiFiClass WiFi;
