/*
 * sEMG sensor packets (udpserver/PROTOCOL.md): plain C99, no Arduino dependencies, so the host test
 * compiles it with gcc and checks the Python parser accepts exactly what this code produces.
 *
 * Binary v1, little-endian:
 *   0  magic 0xE5 0x47 | 2 version 1 | 3 channels | 4 device_id u32 | 8 boot u32 | 12 seq0 u32
 *   16 millis0 u32 | 20 rate_hz u16 | 22 n u16 | 24 n*channels int16 (sample-major)
 *   | 16-byte tag = HMAC-SHA256(key, everything before it)[0..15]
 *
 * The HMAC is injected (sketch: mbedtls; host test: its own SHA-256), so this file needs no crypto.
 */
#ifndef SEMG_PACKET_H
#define SEMG_PACKET_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SEMG_MAGIC0 0xE5u
#define SEMG_MAGIC1 0x47u
#define SEMG_VERSION 1u
#define SEMG_HEADER_SIZE 24u
#define SEMG_TAG_SIZE 16u
#define SEMG_MAX_CHANNELS 16u
#define SEMG_MAX_RATE_HZ 10000u
#define SEMG_MAX_PACKET_SIZE 8192u
/* Keep datagrams within one Ethernet MTU so they are never fragmented. */
#define SEMG_MTU_PAYLOAD 1472u

/* Full HMAC-SHA256 of msg under key into out[32]; returns 0 on success. */
typedef int (*semg_hmac_sha256_fn)(const uint8_t *key, size_t key_len, const uint8_t *msg, size_t msg_len,
                                   uint8_t out[32], void *ctx);

static inline size_t semg_packet_size(uint16_t n, uint8_t channels) {
    return SEMG_HEADER_SIZE + 2u * (size_t)n * channels + SEMG_TAG_SIZE;
}

/* Most samples per packet that fit in one MTU for this channel count. */
static inline uint16_t semg_max_samples_per_mtu(uint8_t channels) {
    return (uint16_t)((SEMG_MTU_PAYLOAD - SEMG_HEADER_SIZE - SEMG_TAG_SIZE) / (2u * channels));
}

static inline void semg_put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)(v >> 8);
}

static inline void semg_put_u32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v & 0xFFu);
    p[1] = (uint8_t)((v >> 8) & 0xFFu);
    p[2] = (uint8_t)((v >> 16) & 0xFFu);
    p[3] = (uint8_t)(v >> 24);
}

/*
 * Build one binary packet into buf (capacity cap). values holds n * channels samples, sample-major.
 * Returns the packet length, or 0 if an argument is out of range, buf is too small or the HMAC failed.
 */
static inline size_t semg_build_packet(uint8_t *buf, size_t cap, uint32_t device_id, uint32_t boot,
                                       uint32_t seq0, uint32_t millis0, uint16_t rate_hz, uint8_t channels,
                                       uint16_t n, const int16_t *values, const uint8_t *key, size_t key_len,
                                       semg_hmac_sha256_fn hmac, void *hmac_ctx) {
    size_t size = semg_packet_size(n, channels);
    size_t body = size - SEMG_TAG_SIZE;
    size_t i;
    uint8_t mac[32];
    if (channels < 1 || channels > SEMG_MAX_CHANNELS || n < 1 || rate_hz < 1 || rate_hz > SEMG_MAX_RATE_HZ ||
        device_id < 1 || size > SEMG_MAX_PACKET_SIZE || size > cap || hmac == NULL) {
        return 0;
    }
    buf[0] = SEMG_MAGIC0;
    buf[1] = SEMG_MAGIC1;
    buf[2] = SEMG_VERSION;
    buf[3] = channels;
    semg_put_u32(buf + 4, device_id);
    semg_put_u32(buf + 8, boot);
    semg_put_u32(buf + 12, seq0);
    semg_put_u32(buf + 16, millis0);
    semg_put_u16(buf + 20, rate_hz);
    semg_put_u16(buf + 22, n);
    for (i = 0; i < (size_t)n * channels; i++) {
        semg_put_u16(buf + SEMG_HEADER_SIZE + 2 * i, (uint16_t)values[i]);
    }
    if (hmac(key, key_len, buf, body, mac, hmac_ctx) != 0) {
        return 0;
    }
    for (i = 0; i < SEMG_TAG_SIZE; i++) {
        buf[body + i] = mac[i];
    }
    return size;
}

/*
 * The legacy text packet "userid,millis,v0,...,vN" (no newline). Returns its length, 0 on error.
 */
static inline size_t semg_build_legacy(char *buf, size_t cap, uint32_t userid, uint32_t millis,
                                       const int16_t *values, uint8_t channels) {
    size_t len;
    uint8_t c;
    int w;
    if (channels < 1 || channels > SEMG_MAX_CHANNELS || userid < 1) {
        return 0;
    }
    w = snprintf(buf, cap, "%lu,%lu", (unsigned long)userid, (unsigned long)millis);
    if (w < 0 || (size_t)w >= cap) {
        return 0;
    }
    len = (size_t)w;
    for (c = 0; c < channels; c++) {
        w = snprintf(buf + len, cap - len, ",%d", (int)values[c]);
        if (w < 0 || (size_t)w >= cap - len) {
            return 0;
        }
        len += (size_t)w;
    }
    return len;
}

#ifdef __cplusplus
}
#endif

#endif /* SEMG_PACKET_H */
