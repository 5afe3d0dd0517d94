#pragma once
#include "Arduino.h"
/* Host: one file per namespace in $SIM_NVS_DIR (sim.cpp), so values survive a restart like NVS does. */
class Preferences {
  public:
    bool begin(const char *ns, bool read_only);
    uint32_t getUInt(const char *key, uint32_t dflt);
    size_t putUInt(const char *key, uint32_t value);
    void end();

  private:
    std::string ns_;
    bool open_ = false;
    bool read_only_ = true;
};
