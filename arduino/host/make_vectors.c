/*
 * Prints the shared packet test vectors (JSON) produced by semg_packet.h. Regenerate the committed file with
 *     gcc -std=c99 -Wall -Wextra -Werror -I arduino -o /tmp/make_vectors arduino/host/make_vectors.c \
 *         && /tmp/make_vectors > arduino/test_vectors.json
 * tests/udpserver/test_udp_vectors.py compiles and runs it, compares with the committed file, and checks
 * that the Python parser accepts every vector with exactly these fields (and builds the same bytes).
 */
#include <stdio.h>
#include <string.h>

#include "semg_packet.h"
#include "sha256_hmac.h"

static uint32_t lcg_state = 12345u;

static uint32_t lcg(void) {
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return lcg_state;
}

static void print_hex(const uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) printf("%02x", p[i]);
}

static void print_values(const int16_t *v, size_t n) {
    size_t i;
    printf("[");
    for (i = 0; i < n; i++) printf("%s%d", i ? "," : "", v[i]);
    printf("]");
}

struct binary_case {
    uint32_t device_id, boot, seq0, millis0;
    uint16_t rate_hz;
    uint8_t channels;
    uint16_t n;
    size_t key_len;
};

int main(void) {
    const struct binary_case cases[] = {
        {1, 0, 0, 0, 500, 1, 1, 16},
        {7, 1, 0, 1234, 500, 4, 10, 32},
        {42, 3, 1000, 4294967000u, 500, 8, 50, 32},
        {65535, 4294967295u, 4294967295u, 4294967295u, 10000, 16, 3, 64},
        {123456789, 17, 250, 86400000u, 1000, 6, semg_max_samples_per_mtu(6), 20},
        {3, 2, 99, 5, 200, 8, semg_max_samples_per_mtu(8), 33},
    };
    uint8_t key[64], buf[SEMG_MAX_PACKET_SIZE];
    int16_t values[SEMG_MAX_PACKET_SIZE / 2];
    char text[512];
    size_t c, i;
    int first = 1;

    printf("{\"generator\": \"arduino/host/make_vectors.c\", \"binary\": [\n");
    for (c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const struct binary_case *k = &cases[c];
        size_t count = (size_t)k->n * k->channels, len;
        for (i = 0; i < k->key_len; i++) key[i] = (uint8_t)lcg();
        for (i = 0; i < count; i++) values[i] = (int16_t)(lcg() >> 16);
        values[0] = -32768;
        values[count - 1] = 32767;
        len = semg_build_packet(buf, sizeof buf, k->device_id, k->boot, k->seq0, k->millis0, k->rate_hz, k->channels,
                                k->n, values, key, k->key_len, hmac_sha256, NULL);
        if (len != semg_packet_size(k->n, k->channels)) {
            fprintf(stderr, "case %zu: build failed\n", c);
            return 1;
        }
        printf("%s  {\"device_id\": %lu, \"boot\": %lu, \"seq0\": %lu, \"millis0\": %lu, \"rate_hz\": %u, "
               "\"channels\": %u, \"n\": %u, \"key\": \"", first ? "" : ",\n", (unsigned long)k->device_id,
               (unsigned long)k->boot, (unsigned long)k->seq0, (unsigned long)k->millis0, k->rate_hz, k->channels, k->n);
        print_hex(key, k->key_len);
        printf("\", \"values\": ");
        print_values(values, count);
        printf(", \"packet\": \"");
        print_hex(buf, len);
        printf("\"}");
        first = 0;
    }
    printf("\n], \"legacy\": [\n");
    first = 1;
    for (c = 1; c <= 16; c += 5) {
        uint32_t userid = 1u + lcg() % 100000u, millis = lcg();
        size_t len;
        for (i = 0; i < c; i++) values[i] = (int16_t)(lcg() >> 16);
        if (c > 1) values[1] = -32768;
        len = semg_build_legacy(text, sizeof text, userid, millis, values, (uint8_t)c);
        if (len == 0) {
            fprintf(stderr, "legacy %zu: build failed\n", c);
            return 1;
        }
        printf("%s  {\"userid\": %lu, \"millis\": %lu, \"values\": ", first ? "" : ",\n", (unsigned long)userid,
               (unsigned long)millis);
        print_values(values, c);
        printf(", \"packet\": \"%s\"}", text);
        first = 0;
    }
    /* invalid arguments must be refused, not encoded */
    if (semg_build_packet(buf, sizeof buf, 1, 0, 0, 0, 500, 17, 1, values, key, 32, hmac_sha256, NULL) != 0 ||
        semg_build_packet(buf, 100, 1, 0, 0, 0, 500, 8, 50, values, key, 32, hmac_sha256, NULL) != 0 ||
        semg_build_packet(buf, sizeof buf, 0, 0, 0, 0, 500, 1, 1, values, key, 32, hmac_sha256, NULL) != 0) {
        fprintf(stderr, "invalid arguments were encoded\n");
        return 1;
    }
    printf("\n]}\n");
    return 0;
}
