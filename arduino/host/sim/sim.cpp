/*
 * Host implementations of the ESP32 Arduino / ESP-IDF APIs declared in this directory, so the unmodified
 * arduinocode.ino runs on Linux against a real udpserver (tests/arduino/test_sketch_host.py):
 *
 *   g++ -std=gnu++17 -O2 -pthread -I DIR_WITH_arduino_secrets.h -I arduino/host/sim -I arduino \
 *       -x c++ arduino/arduinocode.ino arduino/host/sim/sim.cpp -o /tmp/sketch
 *
 * Environment:
 *   SIM_NVS_DIR       directory of the Preferences files (one per namespace): the boot counter survives runs
 *                     like NVS does. Unset: nothing persists (a freshly erased flash at every run).
 *   SIM_WIFI_FILE     the access point is in range while this file exists (unset: always in range).
 *   SIM_WIFI_AUTORECONNECT=0  the WiFi driver does not rejoin by itself after a loss (only WiFi.begin() does),
 *                     as when the core's auto-reconnect gives up.
 *   SIM_WIFI_JOIN_MS  joining (WiFi.begin(), or the driver's own rejoin) takes this long before the station is
 *                     connected (default 0); WiFi.disconnect() abandons a join under way, as on the device.
 *   SIM_WIFI_DROP_AT_SEND=N  the access point leaves range (SIM_WIFI_FILE is removed) during the N-th
 *                     endPacket(), which fails: WiFi lost between the sketch's status check and its send.
 *   SIM_RUN_MS        exit (status 0) after this many ms of run time; SIGTERM/SIGINT also exit with status 0.
 *                     Either prints "sim: exit ..." with the counters below on stderr first.
 *
 * Behaviour, as on the device where it matters:
 *   - millis() counts from program start (CLOCK_MONOTONIC); one FreeRTOS tick is 1 ms.
 *   - tasks are pthreads, queues and task notifications are mutex/condition variables.
 *   - the hardware timer is a thread calling the ISR at its period on absolute deadlines; a late wake-up calls
 *     it for every period that passed (the hardware timer never skips a tick).
 *   - analogRead(pin) returns sim_signal(pin, k) (below), k being the number of timer ticks the calling task
 *     has taken with ulTaskNotifyTake minus one: the signal's value at the tick being served, i.e. the sample
 *     with sequence number k in the sketch.
 *   - WiFiUDP buffers at most 1460 bytes per packet like the ESP32 core's (a longer write sends the first 1460
 *     bytes as a datagram of their own), sends only to 127.0.0.1, and endPacket() fails while WiFi is down.
 *   - a task taking several timer ticks at once (it was late) prints "sim: ticks A..B not served" on stderr:
 *     the sketch must count those samples as timer overruns (their sequence numbers are skipped).
 *   - ESP.restart() exits with status SIM_EXIT_RESTART (75).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <map>
#include <string>
#include <vector>

#include "Arduino.h"
#include "Preferences.h"
#include "WiFi.h"
#include "WiFiUdp.h"
#include "mbedtls/md.h"
#include "../sha256_hmac.h"

#define SIM_EXIT_RESTART 75
#define SIM_UDP_TX_BUFFER 1460

void setup();
void loop();

/* The synthetic signal: a sawtooth per pin, 12 bits (tests/arduino/test_sketch_host.py has the same formula). */
static uint16_t sim_signal(uint8_t pin, uint32_t k) {
    return (uint16_t)((pin * 131u + k * (pin + 1u)) % 4096u);
}

// ---- counters printed at exit ----------------------------------------------------------------------------
static std::atomic<uint64_t> simTimerTicks{0};     // ISR calls
static std::atomic<uint64_t> simMissedTicks{0};    // ticks a task took together with others (sampler late)
static std::atomic<uint64_t> simQueueFull{0};      // xQueueSend refused because the queue was full
static std::atomic<uint64_t> simUdpDatagrams{0};   // datagrams handed to the kernel
static std::atomic<uint64_t> simUdpSplit{0};       // datagrams sent because a write overflowed the tx buffer
static std::atomic<uint64_t> simWifiBegins{0};

static void simExitReport(const char *why) {
    fflush(stdout);
    fprintf(stderr,
            "sim: exit (%s): timer_ticks=%llu missed_ticks=%llu queue_full=%llu udp_datagrams=%llu udp_split=%llu "
            "wifi_begins=%llu\n",
            why, (unsigned long long)simTimerTicks, (unsigned long long)simMissedTicks,
            (unsigned long long)simQueueFull, (unsigned long long)simUdpDatagrams, (unsigned long long)simUdpSplit,
            (unsigned long long)simWifiBegins);
    fflush(stderr);
}

// ---- time --------------------------------------------------------------------------------------------------
static struct timespec simStart;

static uint64_t nowNs() {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t startNs() { return (uint64_t)simStart.tv_sec * 1000000000ull + (uint64_t)simStart.tv_nsec; }

uint32_t millis() { return (uint32_t)((nowNs() - startNs()) / 1000000ull); }

static void sleepNs(uint64_t ns) {
    struct timespec t = {(time_t)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
}

void delay(uint32_t ms) { sleepNs((uint64_t)ms * 1000000ull); }

static struct timespec absAfterTicks(TickType_t ticks) {
    uint64_t at = nowNs() + (uint64_t)ticks * 1000000ull;
    struct timespec t = {(time_t)(at / 1000000000ull), (long)(at % 1000000000ull)};
    return t;
}

static void initCond(pthread_cond_t *c) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(c, &a);
    pthread_condattr_destroy(&a);
}

/* Wait on c until pred() or the ticks pass (portMAX_DELAY: forever). Returns pred(). m is held. */
template <class Pred>
static bool waitFor(pthread_cond_t *c, pthread_mutex_t *m, TickType_t ticks, Pred pred) {
    if (ticks == portMAX_DELAY) {
        while (!pred()) pthread_cond_wait(c, m);
        return true;
    }
    struct timespec until = absAfterTicks(ticks);
    while (!pred()) {
        if (pthread_cond_timedwait(c, m, &until) == ETIMEDOUT) return pred();
    }
    return true;
}

static void tryRealtime(pthread_t th, int prio) {
    // like the ESP32's priorities: best effort (needs CAP_SYS_NICE), silently ignored otherwise
    struct sched_param p;
    p.sched_priority = prio;
    pthread_setschedparam(th, SCHED_FIFO, &p);
}

// ---- tasks and task notifications --------------------------------------------------------------------------
struct tskTaskControlBlock {
    pthread_t thread;
    void (*fn)(void *);
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint32_t notify;
    uint32_t taken;  // timer ticks taken with ulTaskNotifyTake, for analogRead's signal index
};

static thread_local tskTaskControlBlock *currentTask = nullptr;

static tskTaskControlBlock *newTask(void (*fn)(void *), void *arg) {
    tskTaskControlBlock *t = new tskTaskControlBlock();
    t->fn = fn;
    t->arg = arg;
    pthread_mutex_init(&t->mu, nullptr);
    initCond(&t->cv);
    return t;
}

static void *taskMain(void *p) {
    currentTask = (tskTaskControlBlock *)p;
    currentTask->fn(currentTask->arg);
    fprintf(stderr, "sim: a task returned from its function (FreeRTOS would abort)\n");
    abort();
}

BaseType_t xTaskCreatePinnedToCore(void (*fn)(void *), const char *, uint32_t, void *arg, int prio,
                                   TaskHandle_t *handle, int) {
    tskTaskControlBlock *t = newTask(fn, arg);
    if (handle) *handle = t;
    if (pthread_create(&t->thread, nullptr, taskMain, t) != 0) return pdFALSE;
    if (prio > 1) tryRealtime(t->thread, 10);
    return pdTRUE;
}

void vTaskNotifyGiveFromISR(TaskHandle_t task, BaseType_t *woken) {
    pthread_mutex_lock(&task->mu);
    task->notify++;
    pthread_cond_signal(&task->cv);
    pthread_mutex_unlock(&task->mu);
    if (woken) *woken = pdTRUE;
}

uint32_t ulTaskNotifyTake(BaseType_t clear, TickType_t wait) {
    tskTaskControlBlock *t = currentTask;
    pthread_mutex_lock(&t->mu);
    waitFor(&t->cv, &t->mu, wait, [t] { return t->notify > 0; });
    uint32_t v = t->notify;
    if (v > 0) {
        uint32_t took = clear ? v : 1;
        t->notify -= took;
        if (took > 1) {
            // the task was late: it serves the last tick, the ones before it go unserved
            simMissedTicks += took - 1;
            fprintf(stderr, "sim: ticks %u..%u not served (task late)\n", t->taken, t->taken + took - 2);
        }
        t->taken += took;
    }
    pthread_mutex_unlock(&t->mu);
    return v;
}

// ---- queues ------------------------------------------------------------------------------------------------
struct QueueDefinition {
    pthread_mutex_t mu;
    pthread_cond_t notEmpty, notFull;
    uint32_t length, itemSize, head, count;
    std::vector<uint8_t> buf;
};

QueueHandle_t xQueueCreate(uint32_t length, uint32_t item_size) {
    QueueDefinition *q = new QueueDefinition();
    pthread_mutex_init(&q->mu, nullptr);
    initCond(&q->notEmpty);
    initCond(&q->notFull);
    q->length = length;
    q->itemSize = item_size;
    q->buf.resize((size_t)length * item_size);
    return q;
}

BaseType_t xQueueSend(QueueHandle_t q, const void *item, TickType_t wait) {
    pthread_mutex_lock(&q->mu);
    bool ok = waitFor(&q->notFull, &q->mu, wait, [q] { return q->count < q->length; });
    if (ok) {
        memcpy(&q->buf[(size_t)((q->head + q->count) % q->length) * q->itemSize], item, q->itemSize);
        q->count++;
        pthread_cond_signal(&q->notEmpty);
    } else {
        simQueueFull++;
    }
    pthread_mutex_unlock(&q->mu);
    return ok ? pdTRUE : pdFALSE;
}

BaseType_t xQueueReceive(QueueHandle_t q, void *item, TickType_t wait) {
    pthread_mutex_lock(&q->mu);
    bool ok = waitFor(&q->notEmpty, &q->mu, wait, [q] { return q->count > 0; });
    if (ok) {
        memcpy(item, &q->buf[(size_t)q->head * q->itemSize], q->itemSize);
        q->head = (q->head + 1) % q->length;
        q->count--;
        pthread_cond_signal(&q->notFull);
    }
    pthread_mutex_unlock(&q->mu);
    return ok ? pdTRUE : pdFALSE;
}

UBaseType_t uxQueueMessagesWaiting(QueueHandle_t q) {
    pthread_mutex_lock(&q->mu);
    UBaseType_t n = q->count;
    pthread_mutex_unlock(&q->mu);
    return n;
}

// ---- hardware timer ----------------------------------------------------------------------------------------
struct hw_timer_s {
    uint64_t frequency;
    void (*isr)();
    uint64_t alarm;
    bool reload;
    bool running;
    pthread_t thread;
};

static void *timerMain(void *p) {
    hw_timer_t *t = (hw_timer_t *)p;
    const uint64_t period = t->alarm * 1000000000ull / t->frequency;
    uint64_t next = nowNs() + period;
    for (;;) {
        struct timespec at = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, nullptr) == EINTR) {
        }
        const uint64_t now = nowNs();
        while (next <= now) {
            simTimerTicks++;
            t->isr();
            if (!t->reload) return nullptr;
            next += period;
        }
    }
}

static void startTimer(hw_timer_t *t) {
    if (t->running || t->isr == nullptr || t->alarm == 0) return;
    t->running = true;
    pthread_create(&t->thread, nullptr, timerMain, t);
    tryRealtime(t->thread, 20);
}

hw_timer_t *timerBegin(uint32_t frequency) {
    hw_timer_t *t = new hw_timer_t();
    t->frequency = frequency;
    return t;
}

void timerAttachInterrupt(hw_timer_t *timer, void (*isr)()) { timer->isr = isr; }

void timerAlarm(hw_timer_t *timer, uint64_t alarm, bool reload, uint64_t) {
    timer->alarm = alarm;
    timer->reload = reload;
    startTimer(timer);
}

hw_timer_t *timerBegin(uint8_t, uint16_t divider, bool) {
    hw_timer_t *t = new hw_timer_t();
    t->frequency = 80000000ull / (divider ? divider : 1);  // the APB clock
    return t;
}

void timerAttachInterrupt(hw_timer_t *timer, void (*isr)(), bool) { timer->isr = isr; }

void timerAlarmWrite(hw_timer_t *timer, uint64_t alarm, bool reload) {
    timer->alarm = alarm;
    timer->reload = reload;
}

void timerAlarmEnable(hw_timer_t *timer) { startTimer(timer); }

// ---- ADC -----------------------------------------------------------------------------------------------------
static uint8_t adcBits = 12;

uint16_t analogRead(uint8_t pin) {
    uint32_t k = (currentTask && currentTask->taken > 0) ? currentTask->taken - 1 : 0;
    uint16_t v = sim_signal(pin, k);
    return adcBits >= 12 ? (uint16_t)(v << (adcBits - 12)) : (uint16_t)(v >> (12 - adcBits));
}

void analogReadResolution(uint8_t bits) { adcBits = bits; }

void analogSetAttenuation(int) {}

// ---- Serial, ESP -------------------------------------------------------------------------------------------
HardwareSerial Serial;
EspClass ESP;

void HardwareSerial::begin(unsigned long) {}

size_t HardwareSerial::printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    fflush(stdout);
    return n < 0 ? 0 : (size_t)n;
}

size_t HardwareSerial::println(const char *s) {
    int n = ::printf("%s\n", s);
    fflush(stdout);
    return n < 0 ? 0 : (size_t)n;
}

void EspClass::restart() {
    simExitReport("ESP.restart");
    _exit(SIM_EXIT_RESTART);
}

// ---- IPAddress ---------------------------------------------------------------------------------------------
bool IPAddress::fromString(const char *s) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) return false;
    memcpy(a_, &a.s_addr, 4);
    return true;
}

String IPAddress::toString() const {
    char b[16];
    snprintf(b, sizeof b, "%u.%u.%u.%u", a_[0], a_[1], a_[2], a_[3]);
    return String(b);
}

// ---- Preferences (NVS) -------------------------------------------------------------------------------------
static pthread_mutex_t nvsMu = PTHREAD_MUTEX_INITIALIZER;
static std::map<std::string, std::map<std::string, uint32_t>> nvsMemory;  // when SIM_NVS_DIR is unset

static std::string nvsPath(const std::string &ns) {
    const char *dir = getenv("SIM_NVS_DIR");
    return dir && *dir ? std::string(dir) + "/" + ns + ".nvs" : std::string();
}

static std::map<std::string, uint32_t> nvsLoad(const std::string &ns) {
    std::string path = nvsPath(ns);
    if (path.empty()) return nvsMemory[ns];
    std::map<std::string, uint32_t> kv;
    FILE *f = fopen(path.c_str(), "r");
    if (!f) return kv;
    char key[64];
    unsigned long v;
    while (fscanf(f, "%63s %lu", key, &v) == 2) kv[key] = (uint32_t)v;
    fclose(f);
    return kv;
}

static bool nvsStore(const std::string &ns, const std::map<std::string, uint32_t> &kv) {
    std::string path = nvsPath(ns);
    if (path.empty()) {
        nvsMemory[ns] = kv;
        return true;
    }
    mkdir(getenv("SIM_NVS_DIR"), 0700);  // like a fresh flash: created on the first write
    std::string tmp = path + ".tmp";
    FILE *f = fopen(tmp.c_str(), "w");
    if (!f) return false;
    for (const auto &e : kv) fprintf(f, "%s %lu\n", e.first.c_str(), (unsigned long)e.second);
    bool ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    return ok && rename(tmp.c_str(), path.c_str()) == 0;
}

bool Preferences::begin(const char *ns, bool read_only) {
    if (ns == nullptr || *ns == '\0' || strlen(ns) > 15) return false;  // NVS namespaces: 1..15 characters
    ns_ = ns;
    read_only_ = read_only;
    open_ = true;
    return true;
}

uint32_t Preferences::getUInt(const char *key, uint32_t dflt) {
    if (!open_) return dflt;
    pthread_mutex_lock(&nvsMu);
    std::map<std::string, uint32_t> kv = nvsLoad(ns_);
    pthread_mutex_unlock(&nvsMu);
    auto it = kv.find(key);
    return it == kv.end() ? dflt : it->second;
}

size_t Preferences::putUInt(const char *key, uint32_t value) {
    if (!open_ || read_only_) return 0;
    pthread_mutex_lock(&nvsMu);
    std::map<std::string, uint32_t> kv = nvsLoad(ns_);
    kv[key] = value;
    bool ok = nvsStore(ns_, kv);
    pthread_mutex_unlock(&nvsMu);
    return ok ? sizeof(uint32_t) : 0;
}

void Preferences::end() { open_ = false; }

// ---- WiFi --------------------------------------------------------------------------------------------------
WiFiClass WiFi;

static pthread_mutex_t wifiMu = PTHREAD_MUTEX_INITIALIZER;
static bool wifiJoining = false;     // WiFi.begin() called (or the driver rejoins by itself) and not disconnected
static bool wifiAssociated = false;
static bool wifiAutoReconnect = true;
static uint32_t wifiJoinStart = 0;   // millis() when the join under way started

static uint32_t joinMs() {
    const char *v = getenv("SIM_WIFI_JOIN_MS");
    return v ? (uint32_t)strtoul(v, nullptr, 10) : 0;
}

static bool apInRange() {
    const char *f = getenv("SIM_WIFI_FILE");
    struct stat st;
    return f == nullptr || *f == '\0' || stat(f, &st) == 0;
}

static bool driverRejoins() {
    const char *v = getenv("SIM_WIFI_AUTORECONNECT");
    return wifiAutoReconnect && !(v && strcmp(v, "0") == 0);
}

static bool wifiUpdate() {  // wifiMu held
    bool ap = apInRange();
    if (wifiAssociated && !ap) {
        wifiAssociated = false;
        wifiJoining = driverRejoins();
        wifiJoinStart = millis();
    }
    if (!wifiAssociated && wifiJoining && ap && millis() - wifiJoinStart >= joinMs()) wifiAssociated = true;
    return wifiAssociated;
}

int WiFiClass::status() {
    pthread_mutex_lock(&wifiMu);
    bool up = wifiUpdate();
    bool joining = wifiJoining;
    pthread_mutex_unlock(&wifiMu);
    return up ? WL_CONNECTED : joining ? WL_DISCONNECTED : WL_IDLE_STATUS;
}

int WiFiClass::begin(const char *, const char *) {
    pthread_mutex_lock(&wifiMu);
    simWifiBegins++;
    if (!wifiJoining || wifiAssociated) wifiJoinStart = millis();  // begin() during a join lets it go on
    wifiJoining = true;
    wifiUpdate();
    pthread_mutex_unlock(&wifiMu);
    return status();
}

bool WiFiClass::disconnect() {
    pthread_mutex_lock(&wifiMu);
    wifiJoining = false;
    wifiAssociated = false;
    pthread_mutex_unlock(&wifiMu);
    return true;
}

bool WiFiClass::mode(int) { return true; }

bool WiFiClass::setAutoReconnect(bool on) {
    pthread_mutex_lock(&wifiMu);
    wifiAutoReconnect = on;
    pthread_mutex_unlock(&wifiMu);
    return true;
}

int WiFiClass::RSSI() { return status() == WL_CONNECTED ? -60 : 0; }

IPAddress WiFiClass::localIP() { return status() == WL_CONNECTED ? IPAddress(127, 0, 0, 1) : IPAddress(); }

// ---- WiFiUDP -----------------------------------------------------------------------------------------------
int WiFiUDP::beginPacket(IPAddress ip, uint16_t port) {
    if (!(ip[0] == 127 && ip[1] == 0 && ip[2] == 0 && ip[3] == 1)) {
        static bool told = false;
        if (!told) fprintf(stderr, "sim: refusing to send to %s: the simulator sends to 127.0.0.1 only\n",
                           ip.toString().c_str());
        told = true;
        return 0;
    }
    if (fd_ < 0) {
        fd_ = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);  // non-blocking, as lwIP's in the core
        if (fd_ < 0) return 0;
    }
    ip_ = ip;
    port_ = port;
    buf_.clear();
    open_ = true;
    return 1;
}

static bool wifiUp() {
    pthread_mutex_lock(&wifiMu);
    bool up = wifiUpdate();
    pthread_mutex_unlock(&wifiMu);
    return up;
}

// SIM_WIFI_DROP_AT_SEND: the access point goes out of range in the middle of this send
static void dropWifiAtSend() {
    static const char *at = getenv("SIM_WIFI_DROP_AT_SEND");
    static const char *ap = getenv("SIM_WIFI_FILE");
    static unsigned long sends = 0;
    if (at && ap && *ap && ++sends == strtoul(at, nullptr, 10)) unlink(ap);
}

int WiFiUDP::endPacket() {
    dropWifiAtSend();
    if (!open_ || fd_ < 0 || !wifiUp()) return 0;
    struct sockaddr_in to;
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_port = htons(port_);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ssize_t sent = sendto(fd_, buf_.data(), buf_.size(), 0, (struct sockaddr *)&to, sizeof to);
    if (sent < 0) return 0;
    simUdpDatagrams++;
    return 1;
}

size_t WiFiUDP::write(const uint8_t *data, size_t len) {
    if (!open_) return 0;
    for (size_t i = 0; i < len; i++) {
        if (buf_.size() == SIM_UDP_TX_BUFFER) {  // the core sends a full buffer as a datagram and goes on
            simUdpSplit++;
            endPacket();
            buf_.clear();
        }
        buf_.push_back((char)data[i]);
    }
    return len;
}

// ---- mbedtls -----------------------------------------------------------------------------------------------
struct mbedtls_md_info_t {
    mbedtls_md_type_t type;
};
static const mbedtls_md_info_t sha256Info = {MBEDTLS_MD_SHA256};

const mbedtls_md_info_t *mbedtls_md_info_from_type(mbedtls_md_type_t t) {
    return t == MBEDTLS_MD_SHA256 ? &sha256Info : nullptr;
}

int mbedtls_md_hmac(const mbedtls_md_info_t *info, const unsigned char *key, size_t keylen,
                    const unsigned char *input, size_t ilen, unsigned char *output) {
    if (info != &sha256Info) return -0x5100;  // MBEDTLS_ERR_MD_BAD_INPUT_DATA
    return hmac_sha256(key, keylen, input, ilen, output, nullptr);
}

// ---- the Arduino main task ---------------------------------------------------------------------------------
static void *signalMain(void *p) {
    sigset_t *set = (sigset_t *)p;
    int sig = 0;
    sigwait(set, &sig);
    simExitReport(sig == SIGTERM ? "SIGTERM" : "SIGINT");
    _exit(0);
}

static void *runLimitMain(void *p) {
    delay((uint32_t)(uintptr_t)p);
    simExitReport("SIM_RUN_MS");
    _exit(0);
}

int main() {
    clock_gettime(CLOCK_MONOTONIC, &simStart);
    setvbuf(stdout, nullptr, _IOLBF, 0);
    // SIGTERM/SIGINT are taken by a thread of their own: loop() need not return for the process to stop cleanly
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    pthread_t th;
    pthread_create(&th, nullptr, signalMain, &set);
    const char *runMs = getenv("SIM_RUN_MS");
    if (runMs && *runMs) pthread_create(&th, nullptr, runLimitMain, (void *)(uintptr_t)strtoul(runMs, nullptr, 10));
    if (!getenv("SIM_NVS_DIR")) fprintf(stderr, "sim: SIM_NVS_DIR unset: Preferences are not persisted\n");

    currentTask = newTask(nullptr, nullptr);  // the Arduino loopTask
    setup();
    for (;;) loop();
}
