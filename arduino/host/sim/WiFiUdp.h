#pragma once
#include "Arduino.h"
/* Host: a POSIX UDP socket; only 127.0.0.1 is allowed as the destination (sim.cpp). */
class WiFiUDP {
  public:
    int beginPacket(IPAddress ip, uint16_t port);
    size_t write(const uint8_t *data, size_t len);
    int endPacket();

  private:
    int fd_ = -1;
    IPAddress ip_;
    uint16_t port_ = 0;
    std::string buf_;
    bool open_ = false;
};
