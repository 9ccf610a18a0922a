/*
 * breakpoints.c: pause a session's input pass after some layers, read (and optionally scale)
 * the hidden state, resume, and print the generated ids.
 *
 *   ./breakpoints [-p] [-s SCALE] URL MODEL LAYERS IDS MAX_NEW_TOKENS
 *
 * With -p the pauses are in a prefill of IDS (djinn_prefill_ids_breakpoints), and the tokens
 * come from a generate without input after it, sampled from the state the prefill kept.
 *
 * LAYERS and IDS are comma-separated (`1,2,4`, `5,17,99`). At each pause it prints one line
 * `pause LAYER TOKENS HIDDEN SUM` (SUM = the sum of the state read); with -s it multiplies the
 * state by SCALE and writes it back before resuming. Then one line `ids: ...` (tests parse both).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "djinn.h"

/* Bounds of this example: ids in, layers, tokens out, floats of one hidden state. */
#define IDS_MAX 1024
#define LAYERS_MAX 64
#define TOKENS_MAX 4096
#define STATE_FLOATS_MAX (1 << 22)

struct run {
    float scale;
    int patch;
    float *state;
    uint32_t out[TOKENS_MAX];
    size_t n_out;
};

static size_t parse_list(const char *s, uint32_t *out, size_t max) {
    size_t n = 0;
    while (*s && n < max) {
        char *end;
        out[n++] = (uint32_t)strtoul(s, &end, 10);
        s = (*end == ',') ? end + 1 : end;
        if (end == s && *s) {
            break;
        }
    }
    return n;
}

static int on_token(void *user, uint32_t token, const char *text, size_t text_len) {
    struct run *r = (struct run *)user;
    (void)text;
    (void)text_len;
    if (r->n_out < TOKENS_MAX) {
        r->out[r->n_out++] = token;
    }
    return 0;
}

static int on_pause(void *user, djinn_pause *pause, uint32_t layer, uint32_t tokens, uint32_t hidden) {
    struct run *r = (struct run *)user;
    size_t n = (size_t)tokens * hidden;
    double sum = 0.0;
    size_t i;
    if (n > STATE_FLOATS_MAX || djinn_pause_read(pause, r->state, n) != DJINN_OK) {
        fprintf(stderr, "read: %s\n", djinn_last_error());
        return 1; /* cancel */
    }
    for (i = 0; i < n; i++) {
        sum += r->state[i];
    }
    printf("pause %u %u %u %.6f\n", layer, tokens, hidden, sum);
    if (r->patch) {
        for (i = 0; i < n; i++) {
            r->state[i] *= r->scale;
        }
        if (djinn_pause_write(pause, r->state, n) != DJINN_OK) {
            fprintf(stderr, "write: %s\n", djinn_last_error());
            return 1;
        }
    }
    return 0; /* resume */
}

int main(int argc, char **argv) {
    static struct run r;
    static uint32_t ids[IDS_MAX], layers[LAYERS_MAX];
    djinn_client *client = NULL;
    djinn_session_info info;
    djinn_decode_params params;
    djinn_generate_result res;
    size_t n_ids, n_layers, i;
    int a = 1, rc, prefill = 0;
    uint32_t context = 0;
    if (argc > 1 && strcmp(argv[1], "-p") == 0) {
        prefill = 1;
        a = 2;
    }
    if (argc > a + 1 && strcmp(argv[a], "-s") == 0) {
        r.patch = 1;
        r.scale = (float)atof(argv[a + 1]);
        a += 2;
    }
    if (argc - a != 5) {
        fprintf(stderr, "usage: %s [-p] [-s SCALE] URL MODEL LAYERS IDS MAX_NEW_TOKENS\n", argv[0]);
        return 2;
    }
    n_layers = parse_list(argv[a + 2], layers, LAYERS_MAX);
    n_ids = parse_list(argv[a + 3], ids, IDS_MAX);
    r.state = malloc(sizeof(float) * STATE_FLOATS_MAX);
    if (r.state == NULL) {
        return 1;
    }
    if (djinn_connect(argv[a], NULL, &client) != DJINN_OK ||
        djinn_session_open(client, argv[a + 1], DJINN_QOS_INTERACTIVE, 0, &info) != DJINN_OK) {
        fprintf(stderr, "%s\n", djinn_last_error());
        return 1;
    }
    djinn_decode_params_default(&params);
    params.max_new_tokens = (uint32_t)atoi(argv[a + 4]);
    params.ignore_eos = 1;
    if (prefill) {
        rc = djinn_prefill_ids_breakpoints(client, info.session, ids, n_ids, layers, n_layers, on_pause, &r, &context);
        if (rc != DJINN_OK || context != n_ids) {
            fprintf(stderr, "prefill: %s (%s), %u tokens\n", djinn_last_error(), djinn_code_name(rc), context);
            return 1;
        }
        rc = djinn_generate_ids(client, info.session, NULL, 0, &params, on_token, &r, &res);
    } else {
        rc = djinn_generate_ids_breakpoints(client, info.session, ids, n_ids, layers, n_layers, &params, on_token,
                                            on_pause, &r, &res);
    }
    if (rc != DJINN_OK) {
        fprintf(stderr, "generate: %s (%s)\n", djinn_last_error(), djinn_code_name(rc));
        return 1;
    }
    printf("ids:");
    for (i = 0; i < r.n_out; i++) {
        printf(" %u", r.out[i]);
    }
    printf("\n");
    djinn_session_close(client, info.session);
    djinn_client_free(client);
    free(r.state);
    return 0;
}
