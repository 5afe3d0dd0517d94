/*
 * sEMG sensor for ESP32: samples its analog channels on a hardware timer at a fixed rate and streams them
 * over WiFi/UDP to the platform's udpserver (wire format: udpserver/PROTOCOL.md).
 *
 *   - binary protocol (default): batches of SAMPLES_PER_PACKET samples with device id, boot counter,
 *     sequence number, device time and an HMAC-SHA256 tag (mbedtls) under the device's secret key;
 *   - legacy protocol (SEMG_LEGACY_PROTOCOL 1): the original "userid,millis,v0,...,vN" text, one packet
 *     per sample, for users whose device is registered as legacy.
 *
 * Credentials, server address, device id and key live in arduino_secrets.h (git-ignored; copy
 * arduino_secrets.h.example). Register the device first, e.g.
 *     python testing/udpsim.py --register --users 1 --channels 4 --rate 500
 * and paste the printed device id and key.
 *
 * Works with the ESP32 Arduino core 2.x and 3.x (their hardware timer APIs differ).
 */
#include <Arduino.h>
#include <Preferences.h>
#include <WiFi.h>
#include <WiFiUdp.h>

#include "arduino_secrets.h"
#include "mbedtls/md.h"
#include "semg_packet.h"

// ---- configuration ----------------------------------------------------------------------------------------
#ifndef SEMG_SAMPLE_RATE_HZ
#define SEMG_SAMPLE_RATE_HZ 500  // per channel; the timer fires at this rate
#endif
// The rate may have decimals (the web UI's snippet writes the registered rate, e.g. 333.3): the timer's period
// comes from it, the packet header carries the nearest whole number (udpserver/PROTOCOL.md). Never pass the
// macro itself to printf: a fractional one is a double there.
static_assert(SEMG_SAMPLE_RATE_HZ >= 1 && SEMG_SAMPLE_RATE_HZ < 10000.5, "SEMG_SAMPLE_RATE_HZ must be 1..10000");
static const uint32_t SAMPLE_PERIOD_US = (uint32_t)(1000000.0 / (SEMG_SAMPLE_RATE_HZ) + 0.5);
static const uint16_t HEADER_RATE_HZ = (uint16_t)((SEMG_SAMPLE_RATE_HZ) + 0.5);
#ifndef SEMG_LEGACY_PROTOCOL
#define SEMG_LEGACY_PROTOCOL 0
#endif
// 25 samples = 50 ms at 500 Hz: low latency for live prediction, ~20 packets/s. A packet (40 + 2 * CHANNELS
// * SAMPLES_PER_PACKET bytes) must fit in WiFiUDP's buffer: at most 177 samples with 4 channels.
#ifndef SAMPLES_PER_PACKET
#define SAMPLES_PER_PACKET 25
#endif
// ADC1 pins only: ADC2 cannot be read while WiFi is on.
static const uint8_t ANALOG_PINS[] = {36, 39, 34, 35};
static const uint8_t CHANNELS = sizeof(ANALOG_PINS) / sizeof(ANALOG_PINS[0]);
// Samples buffered between the sampler and the sender. While WiFi is down they stay here and go out when it is
// back, so an outage shorter than this (~2 s at 500 Hz) loses nothing; past it the newest are dropped (counted).
#ifndef QUEUE_SAMPLES
#define QUEUE_SAMPLES 1024
#endif
// The ESP32 core's WiFiUDP buffers this many bytes per packet and sends a longer one as two datagrams (which the
// server rejects as truncated/malformed). Below one Ethernet MTU (1472), so packets are never fragmented either.
static const size_t UDP_TX_BUFFER = 1460;
#ifndef DIAG_INTERVAL_MS
#define DIAG_INTERVAL_MS 5000  // how often the diagnostics line is printed (serial monitor)
#endif
#ifndef WIFI_RETRY_MS
#define WIFI_RETRY_MS 5000  // while WiFi is down, rejoin after this long, then after twice as long each time...
#endif
#ifndef WIFI_RETRY_MAX_MS
#define WIFI_RETRY_MAX_MS 60000  // ...up to this
#endif
// Restart (and so bump the boot counter) long before the 32-bit sequence number could wrap.
#ifndef SEQ_RESTART_AT
#define SEQ_RESTART_AT 0xFFF00000u
#endif
#ifndef SEMG_FIRST_SEQ
#define SEMG_FIRST_SEQ 0u  // sequence number of a boot's first sample (tests start near SEQ_RESTART_AT)
#endif

struct Sample {
    uint32_t seq;
    uint32_t millis;
    int16_t v[SEMG_MAX_CHANNELS];
};

struct Stats {
    uint32_t samples;          // taken by the sampler
    uint32_t timer_overruns;   // timer ticks the sampler could not serve (samples never taken)
    uint32_t queue_drops;      // samples lost because the sender fell behind
    uint32_t packets_sent;
    uint32_t send_failures;    // sends refused (no WiFi, or the UDP stack): the packet is sent again
    uint32_t wifi_reconnects;
};

static Stats stats;  // diagnostics only: a torn read from the other core is harmless
static QueueHandle_t sampleQueue;
static TaskHandle_t samplerHandle;
static hw_timer_t *sampleTimer = NULL;
static WiFiUDP udp;
static IPAddress serverIp;
static uint8_t deviceKey[64];
static size_t deviceKeyLen = 0;
static uint32_t bootCounter = 0;
static uint32_t nextSeq = SEMG_FIRST_SEQ;  // written by the sampler task only

// batch being assembled by the sender (loop)
static int16_t batchValues[SAMPLES_PER_PACKET * SEMG_MAX_CHANNELS];
static uint16_t batchCount = 0;
static uint32_t batchSeq0 = 0;
static uint32_t batchMillis0 = 0;
static uint8_t packetBuf[SEMG_MAX_PACKET_SIZE];

// ---- crypto -------------------------------------------------------------------------------------------------
static int hmacMbedtls(const uint8_t *key, size_t keyLen, const uint8_t *msg, size_t msgLen, uint8_t out[32], void *) {
    const mbedtls_md_info_t *info = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
    return mbedtls_md_hmac(info, key, keyLen, msg, msgLen, out) == 0 ? 0 : -1;
}

#if !SEMG_LEGACY_PROTOCOL  // the key is for binary packets only
static int hexNibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static bool parseKey(const char *hex) {
    size_t len = strlen(hex);
    if (len % 2 != 0 || len < 32 || len > 128) return false;
    for (size_t i = 0; i < len / 2; i++) {
        int hi = hexNibble(hex[2 * i]), lo = hexNibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        deviceKey[i] = (uint8_t)(hi << 4 | lo);
    }
    deviceKeyLen = len / 2;
    return true;
}
#endif

// ---- sampling ------------------------------------------------------------------------------------------------
// The timer interrupt only wakes the sampler task: analogRead is not safe inside an ISR.
static void IRAM_ATTR onSampleTimer() {
    BaseType_t woken = pdFALSE;
    vTaskNotifyGiveFromISR(samplerHandle, &woken);
    if (woken == pdTRUE) {
        portYIELD_FROM_ISR();
    }
}

static void samplerTask(void *) {
    Sample s;
    for (;;) {
        uint32_t ticks = ulTaskNotifyTake(pdTRUE, portMAX_DELAY);
        if (ticks > 1) {
            // Missed ticks keep their sequence numbers, so the server counts them as lost.
            stats.timer_overruns += ticks - 1;
            nextSeq += ticks - 1;
        }
        s.seq = nextSeq++;
        s.millis = millis();
        for (uint8_t c = 0; c < CHANNELS; c++) {
            s.v[c] = (int16_t)analogRead(ANALOG_PINS[c]);
        }
        stats.samples++;
        if (xQueueSend(sampleQueue, &s, 0) != pdTRUE) {
            stats.queue_drops++;
        }
    }
}

static void startSampleTimer() {
    const uint32_t periodUs = SAMPLE_PERIOD_US;
#if defined(ESP_ARDUINO_VERSION_MAJOR) && ESP_ARDUINO_VERSION_MAJOR >= 3
    sampleTimer = timerBegin(1000000);  // 1 MHz tick
    timerAttachInterrupt(sampleTimer, &onSampleTimer);
    timerAlarm(sampleTimer, periodUs, true, 0);
#else
    sampleTimer = timerBegin(0, 80, true);  // 80 MHz APB / 80 = 1 MHz tick
    timerAttachInterrupt(sampleTimer, &onSampleTimer, true);
    timerAlarmWrite(sampleTimer, periodUs, true);
    timerAlarmEnable(sampleTimer);
#endif
}

// ---- network -------------------------------------------------------------------------------------------------
static uint32_t wifiLastAttempt = 0;  // millis() of the last WiFi.begin()

static void ensureWifi() {
    // Rejoin after WIFI_RETRY_MS, then twice as long each time (up to WIFI_RETRY_MAX_MS): a join that takes
    // longer than the interval (slow DHCP, enterprise auth, a weak signal) would otherwise be cut off by the
    // next WiFi.disconnect() every time and never complete.
    static uint32_t retryMs = WIFI_RETRY_MS;
    static bool wasConnected = false;
    bool connected = WiFi.status() == WL_CONNECTED;
    if (connected && !wasConnected) {
        Serial.printf("semg: WiFi connected, ip %s, rssi %d dBm\n", WiFi.localIP().toString().c_str(), WiFi.RSSI());
        retryMs = WIFI_RETRY_MS;
    }
    if (!connected && wasConnected) {
        Serial.printf("semg: WiFi lost; up to %u samples are kept for when it is back, later ones are dropped "
                      "(queue drops)\n", (unsigned)QUEUE_SAMPLES);
        wifiLastAttempt = millis();  // the driver rejoins by itself first
    }
    wasConnected = connected;
    if (!connected && millis() - wifiLastAttempt > retryMs) {
        wifiLastAttempt = millis();
        retryMs = retryMs >= WIFI_RETRY_MAX_MS / 2 ? WIFI_RETRY_MAX_MS : retryMs * 2;
        stats.wifi_reconnects++;
        WiFi.disconnect();
        WiFi.begin(SECRET_SSID, SECRET_PASS);
    }
}

// A packet whose send failed (WiFi went down between loop()'s check and the send, or the UDP stack had no
// buffer) stays in packetBuf and is sent again before anything newer: its samples have already left the queue,
// so dropping it would lose them although the outage is shorter than the queue.
static size_t pendingLen = 0;

static bool sendDatagram(const uint8_t *data, size_t len) {
    if (WiFi.status() == WL_CONNECTED && udp.beginPacket(serverIp, SECRET_SERVER_PORT) == 1 &&
        udp.write(data, len) == len && udp.endPacket() == 1) {
        stats.packets_sent++;
        return true;
    }
    stats.send_failures++;
    return false;
}

// Sends the packet left over by a failed send, if any. False while it is still unsent.
static bool sendPending() {
    if (pendingLen == 0) return true;
    if (!sendDatagram(packetBuf, pendingLen)) return false;
    pendingLen = 0;
    return true;
}

// Sends the packet built in packetBuf; when refused it stays there as the pending one. False then.
static bool sendOrKeep(size_t len) {
    if (sendDatagram(packetBuf, len)) return true;
    pendingLen = len;
    return false;
}

// Builds and sends the batch. False when the send failed (the packet is kept as pending).
static bool flushBatch() {
    if (batchCount == 0) return true;
    size_t len = semg_build_packet(packetBuf, sizeof packetBuf, SECRET_DEVICE_ID, bootCounter, batchSeq0,
                                   batchMillis0, HEADER_RATE_HZ, CHANNELS, batchCount, batchValues,
                                   deviceKey, deviceKeyLen, hmacMbedtls, NULL);
    batchCount = 0;
    if (len == 0) {  // cannot happen with the sizes checked in setup(); counted rather than retried forever
        stats.send_failures++;
        return true;
    }
    return sendOrKeep(len);
}

// Adds a sample to the batch, sending what is complete. False when a send failed (see pendingLen): the caller
// stops taking samples off the queue until the pending packet is sent.
static bool queueSample(const Sample &s) {
#if SEMG_LEGACY_PROTOCOL
    size_t len = semg_build_legacy((char *)packetBuf, sizeof packetBuf, SECRET_USER_ID, s.millis, s.v, CHANNELS);
    return len == 0 || sendOrKeep(len);
#else
    bool sent = true;
    // a packet holds consecutive samples only: a gap (overrun, queue drop) starts a new one
    if (batchCount > 0 && s.seq != batchSeq0 + batchCount) sent = flushBatch();
    if (batchCount == 0) {
        batchSeq0 = s.seq;
        batchMillis0 = s.millis;
    }
    memcpy(&batchValues[batchCount * CHANNELS], s.v, CHANNELS * sizeof(int16_t));
    if (++batchCount == SAMPLES_PER_PACKET) sent = flushBatch() && sent;
    return sent;
#endif
}

static void printDiagnostics() {
    static uint32_t last = 0;
    if (millis() - last < DIAG_INTERVAL_MS) return;
    last = millis();
    Serial.printf("semg: boot %lu seq %lu | wifi %s rssi %d | samples %lu sent %lu pkts | send failures %lu, "
                  "queue drops %lu, timer overruns %lu, wifi retries %lu | queued %u\n",
                  (unsigned long)bootCounter, (unsigned long)nextSeq,
                  WiFi.status() == WL_CONNECTED ? "up" : "DOWN", WiFi.RSSI(), (unsigned long)stats.samples,
                  (unsigned long)stats.packets_sent, (unsigned long)stats.send_failures,
                  (unsigned long)stats.queue_drops, (unsigned long)stats.timer_overruns,
                  (unsigned long)stats.wifi_reconnects, (unsigned)uxQueueMessagesWaiting(sampleQueue));
}

static void halt(const char *why) {
    for (;;) {
        Serial.printf("semg: FATAL %s\n", why);
        delay(5000);
    }
}

// ---- Arduino entry points ------------------------------------------------------------------------------------
void setup() {
    Serial.begin(115200);
    delay(200);
    // The boot counter makes sequence numbers restarting after a reboot distinguishable from replays.
    Preferences prefs;
    prefs.begin("semg", false);
    bootCounter = prefs.getUInt("boot", 0) + 1;
    prefs.putUInt("boot", bootCounter);
    prefs.end();
    Serial.printf("semg: device %lu boot %lu, %u channels at %u Hz, %s protocol, %u samples/packet\n",
                  (unsigned long)SECRET_DEVICE_ID, (unsigned long)bootCounter, CHANNELS, (unsigned)HEADER_RATE_HZ,
                  SEMG_LEGACY_PROTOCOL ? "legacy" : "binary", SAMPLES_PER_PACKET);

#if !SEMG_LEGACY_PROTOCOL
    if (!parseKey(SECRET_DEVICE_KEY_HEX)) halt("SECRET_DEVICE_KEY_HEX must be 32..128 hex digits");
    if (semg_packet_size(SAMPLES_PER_PACKET, CHANNELS) > UDP_TX_BUFFER) {
        halt("SAMPLES_PER_PACKET too large: a packet must fit in WiFiUDP's 1460 bytes (40 + 2 bytes per value)");
    }
#endif
    if (!serverIp.fromString(SECRET_SERVER_IP)) halt("SECRET_SERVER_IP is not an IP address");

    analogReadResolution(12);
    analogSetAttenuation(ADC_11db);  // full 0..3.3 V range
    WiFi.mode(WIFI_STA);
    WiFi.setAutoReconnect(true);
    WiFi.begin(SECRET_SSID, SECRET_PASS);
    wifiLastAttempt = millis();

    sampleQueue = xQueueCreate(QUEUE_SAMPLES, sizeof(Sample));
    if (sampleQueue == NULL) halt("cannot allocate the sample queue");
    // Sampler on core 1 at high priority; WiFi runs on core 0.
    xTaskCreatePinnedToCore(samplerTask, "semg-sampler", 4096, NULL, configMAX_PRIORITIES - 2, &samplerHandle, 1);
    startSampleTimer();
}

void loop() {
    ensureWifi();
    if (WiFi.status() != WL_CONNECTED) {
        if (nextSeq >= SEQ_RESTART_AT) {
            // The sampler counts on while nothing is sent: restart before its sequence number wraps, or every
            // packet after the outage would be a replay of this boot to the server (the queued samples are lost).
            Serial.println("semg: sequence number nearly exhausted; restarting (new boot)");
            ESP.restart();
        }
        delay(5);  // keep the samples queued (see QUEUE_SAMPLES) until there is a network to send them to
        printDiagnostics();
        return;
    }
    if (!sendPending()) {  // WiFi dropped while sending, or the stack refused it: try again next loop()
        delay(5);
        printDiagnostics();
        return;
    }
    // Take what the sampler has queued (waiting up to 5 ms for a first sample), then return: a sample arrives
    // every 2 ms at 500 Hz, so waiting for the next one each time would never let loop() get back to
    // ensureWifi() and printDiagnostics().
    Sample s;
    if (xQueueReceive(sampleQueue, &s, pdMS_TO_TICKS(5)) == pdTRUE) {
        UBaseType_t more = uxQueueMessagesWaiting(sampleQueue);
        for (;;) {
            bool sent = queueSample(s);
            if (s.seq >= SEQ_RESTART_AT) {
                if (sent) flushBatch();
                Serial.println("semg: sequence number nearly exhausted; restarting (new boot)");
                ESP.restart();
            }
            if (!sent || more == 0 || xQueueReceive(sampleQueue, &s, 0) != pdTRUE) break;
            more--;
        }
    }
    printDiagnostics();
}
