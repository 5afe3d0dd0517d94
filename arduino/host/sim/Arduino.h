/* The ESP32 Arduino APIs the sketch uses, for the host: the declarations are what the ESP32 core offers (so
 * `g++ -fsyntax-only` type-checks arduinocode.ino against them), and sim.cpp implements them on Linux so the
 * unmodified sketch runs against a real udpserver (see sim.cpp for the environment variables). */
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <string>

#define IRAM_ATTR
#ifndef ESP_ARDUINO_VERSION_MAJOR
#define ESP_ARDUINO_VERSION_MAJOR 3
#endif
typedef int BaseType_t;
typedef unsigned int UBaseType_t;
typedef uint32_t TickType_t;
typedef struct QueueDefinition *QueueHandle_t;
typedef struct tskTaskControlBlock *TaskHandle_t;
typedef struct hw_timer_s hw_timer_t;
#define pdTRUE 1
#define pdFALSE 0
#define portMAX_DELAY 0xffffffffu
#define configMAX_PRIORITIES 25
#define configTICK_RATE_HZ 1000
#define pdMS_TO_TICKS(ms) ((TickType_t)(((uint64_t)(ms) * configTICK_RATE_HZ) / 1000u))
#define portYIELD_FROM_ISR() do {} while (0)
#define ADC_11db 3

uint32_t millis();
void delay(uint32_t ms);
uint16_t analogRead(uint8_t pin);
void analogReadResolution(uint8_t bits);
void analogSetAttenuation(int att);
void vTaskNotifyGiveFromISR(TaskHandle_t task, BaseType_t *woken);
uint32_t ulTaskNotifyTake(BaseType_t clear, TickType_t wait);
QueueHandle_t xQueueCreate(uint32_t length, uint32_t item_size);
BaseType_t xQueueSend(QueueHandle_t q, const void *item, TickType_t wait);
BaseType_t xQueueReceive(QueueHandle_t q, void *item, TickType_t wait);
UBaseType_t uxQueueMessagesWaiting(QueueHandle_t q);
BaseType_t xTaskCreatePinnedToCore(void (*fn)(void *), const char *name, uint32_t stack, void *arg, int prio,
                                   TaskHandle_t *handle, int core);
hw_timer_t *timerBegin(uint32_t frequency);
void timerAttachInterrupt(hw_timer_t *timer, void (*isr)());
void timerAlarm(hw_timer_t *timer, uint64_t alarm, bool reload, uint64_t count);
/* core 2.x timer API */
hw_timer_t *timerBegin(uint8_t num, uint16_t divider, bool count_up);
void timerAttachInterrupt(hw_timer_t *timer, void (*isr)(), bool edge);
void timerAlarmWrite(hw_timer_t *timer, uint64_t alarm, bool reload);
void timerAlarmEnable(hw_timer_t *timer);

class String {
  public:
    String(const char *s = "") : s_(s) {}
    const char *c_str() const { return s_.c_str(); }

  private:
    std::string s_;
};

class IPAddress {
  public:
    IPAddress() : a_{0, 0, 0, 0} {}
    IPAddress(uint8_t a, uint8_t b, uint8_t c, uint8_t d) : a_{a, b, c, d} {}
    bool fromString(const char *s);
    String toString() const;
    uint8_t operator[](int i) const { return a_[i]; }

  private:
    uint8_t a_[4];
};

class HardwareSerial {
  public:
    void begin(unsigned long baud);
    size_t printf(const char *fmt, ...) __attribute__((format(printf, 2, 3)));
    size_t println(const char *s);
};
extern HardwareSerial Serial;

class EspClass {
  public:
    void restart();
};
extern EspClass ESP;
