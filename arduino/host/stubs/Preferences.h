#pragma once
#include "Arduino.h"
class Preferences {
  public:
    bool begin(const char *ns, bool read_only);
    uint32_t getUInt(const char *key, uint32_t dflt);
    size_t putUInt(const char *key, uint32_t value);
    void end();
};
