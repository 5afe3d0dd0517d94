/* Minimal stand-ins for the ESP32 Arduino APIs the sketch uses: lets the host test type-check
 * arduinocode.ino with g++ -fsyntax-only. Declarations only; nothing here runs. */
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define IRAM_ATTR
#ifndef ESP_ARDUINO_VERSION_MAJOR
#define ESP_ARDUINO_VERSION_MAJOR 3
#endif
typedef int BaseType_t;
typedef uint32_t TickType_t;
typedef void *QueueHandle_t;
typedef void *TaskHandle_t;
typedef struct hw_timer_s hw_timer_t;
#define pdTRUE 1
#define pdFALSE 0
#define portMAX_DELAY 0xffffffffu
#define configMAX_PRIORITIES 25
#define pdMS_TO_TICKS(ms) ((TickType_t)(ms))
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
uint32_t uxQueueMessagesWaiting(QueueHandle_t q);
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
    const char *c_str() const;
};

class IPAddress {
  public:
    bool fromString(const char *s);
    String toString() const;
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
