/*
 * chat.c: a multi-turn session through libdjinn, streaming tokens as they come.
 *
 *   cargo build --release -p djinn-ffi
 *   cc -std=c99 -I ffi/include ffi/examples/chat.c -L target/release -ldjinn -Wl,-rpath,"$PWD/target/release" -o chat
 *   (or statically: cc ... ffi/examples/chat.c target/release/libdjinn.a -lgcc_s -lutil -lrt -lpthread -lm -ldl)
 *   ./chat [-n MAX_NEW_TOKENS] [-e] [-t TOKEN] URL MODEL [TURN ...]
 *
 * Each TURN is a user message sent through the model's chat template, or `ids:1,2,3` to feed raw
 * token ids (for models without a tokenizer). Without turns, two chat turns are sent.
 * -e keeps generating past EOS. For every turn the example streams the text to stdout and then
 * prints one line `turn N ids: ...` with the generated token ids (tests parse it), and at the end
 * the bytes the connection moved.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "djinn.h"

/* Token ids one turn may collect (the example's own bound; generation is capped to it). */
#define TURN_TOKENS_MAX 4096
/* Prompt ids one `ids:` turn may carry. */
#define PROMPT_IDS_MAX 4096

struct turn_state {
    uint32_t ids[TURN_TOKENS_MAX];
    size_t count;
};

/* Streams each token's text (or its id when the model has no tokenizer) and records its id. */
static int on_token(void *user, uint32_t token, const char *text, size_t text_len) {
    struct turn_state *st = (struct turn_state *)user;
    if (st->count < TURN_TOKENS_MAX) {
        st->ids[st->count++] = token;
    }
    if (text_len > 0) {
        fwrite(text, 1, text_len, stdout);
    } else {
        printf("<%u>", (unsigned)token);
    }
    fflush(stdout);
    return 0; /* non-zero would cancel the generation */
}

static int fail(const char *what, int code) {
    fprintf(stderr, "%s failed: %s (%d): %s\n", what, djinn_code_name(code), code, djinn_last_error());
    return 1;
}

/* Parses "ids:1,2,3" into ids; returns the count, or -1 when malformed. */
static long parse_ids(const char *s, uint32_t *ids, size_t max) {
    size_t n = 0;
    s += 4;
    while (*s) {
        char *end = NULL;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || n == max || v > UINT32_MAX) {
            return -1;
        }
        ids[n++] = (uint32_t)v;
        s = end;
        if (*s == ',') {
            s++;
        } else if (*s) {
            return -1;
        }
    }
    return (long)n;
}

int main(int argc, char **argv) {
    djinn_decode_params params;
    djinn_decode_params_default(&params);
    params.max_new_tokens = 32;
    const char *token = NULL;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            params.max_new_tokens = (uint32_t)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "-t") == 0 && i + 1 < argc) {
            token = argv[++i];
        } else if (strcmp(argv[i], "-e") == 0) {
            params.ignore_eos = 1;
        } else {
            break;
        }
    }
    if (argc - i < 2) {
        fprintf(stderr, "usage: %s [-n MAX_NEW_TOKENS] [-e] [-t TOKEN] URL MODEL [TURN ...]\n", argv[0]);
        return 2;
    }
    if (params.max_new_tokens > TURN_TOKENS_MAX) {
        params.max_new_tokens = TURN_TOKENS_MAX;
    }
    const char *url = argv[i];
    const char *model = argv[i + 1];
    const char *default_turns[] = {"What is the capital of France? Answer in one sentence.",
                                   "And of Germany?"};
    const char **turns = default_turns;
    int n_turns = 2;
    if (argc - i > 2) {
        turns = (const char **)&argv[i + 2];
        n_turns = argc - i - 2;
    }

    printf("libdjinn %s: connecting to %s\n", djinn_version(), url);
    djinn_client *client = NULL;
    int rc = djinn_connect(url, token, &client);
    if (rc != DJINN_OK) {
        return fail("djinn_connect", rc);
    }
    djinn_session_info info;
    rc = djinn_session_open(client, model, DJINN_QOS_INTERACTIVE, 0, &info);
    if (rc != DJINN_OK) {
        fail("djinn_session_open", rc);
        djinn_client_free(client);
        return 1;
    }
    printf("session %llu on %s: context %u tokens, vocab %u, tokenizer %u, chat template %u\n",
           (unsigned long long)info.session, model, (unsigned)info.max_tokens, (unsigned)info.vocab, (unsigned)info.has_tokenizer,
           (unsigned)info.has_chat_template);

    static struct turn_state st;
    static uint32_t prompt[PROMPT_IDS_MAX];
    int status = 0;
    for (int t = 0; t < n_turns && status == 0; t++) {
        djinn_generate_result res;
        st.count = 0;
        if (strncmp(turns[t], "ids:", 4) == 0) {
            long n = parse_ids(turns[t], prompt, PROMPT_IDS_MAX);
            if (n < 0) {
                fprintf(stderr, "turn %d: malformed %s\n", t + 1, turns[t]);
                status = 2;
                break;
            }
            printf("\n[turn %d] ids (%ld)\n", t + 1, n);
            rc = djinn_generate_ids(client, info.session, prompt, (size_t)n, &params, on_token, &st, &res);
        } else {
            printf("\n[turn %d] user: %s\nassistant: ", t + 1, turns[t]);
            rc = djinn_generate_text(client, info.session, DJINN_INPUT_CHAT, turns[t], &params, on_token, &st,
                                     &res);
        }
        if (rc != DJINN_OK) {
            status = fail("djinn_generate", rc);
            break;
        }
        printf("\n[%u prompt tokens, %u generated, finish %u, context %u]\nturn %d ids:", res.prompt_tokens,
               res.tokens, res.finish, res.context_tokens, t + 1);
        for (size_t k = 0; k < st.count; k++) {
            printf(" %u", (unsigned)st.ids[k]);
        }
        printf("\n");
    }
    rc = djinn_session_close(client, info.session);
    if (rc != DJINN_OK && status == 0) {
        status = fail("djinn_session_close", rc);
    }
    printf("bytes sent %llu, received %llu\n", (unsigned long long)djinn_bytes_sent(client),
           (unsigned long long)djinn_bytes_received(client));
    djinn_client_free(client);
    return status;
}
