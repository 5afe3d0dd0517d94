#pragma once
#include "Arduino.h"
class WiFiUDP {
  public:
    int beginPacket(IPAddress ip, uint16_t port);
    size_t write(const uint8_t *data, size_t len);
    int endPacket();
};
