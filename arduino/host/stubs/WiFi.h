#pragma once
#include "Arduino.h"
#define WL_CONNECTED 3
#define WIFI_STA 1
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
