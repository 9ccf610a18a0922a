/*
 * djinn.h: the C ABI of the djinn-dataplane client (library `libdjinn`, crate ffi/).
 *
 * An application without a GPU opens a session on a model held by a djinn-dataplane server; the
 * weights and the KV cache stay on the server and only token ids (and their text) cross the wire.
 *
 * Conventions (C99):
 *  - Every function that can fail returns an `int` code: DJINN_OK (0) on success, a positive code
 *    that is the server's status number (DJINN_E_BAD_ARGUMENT, DJINN_E_UNKNOWN_MODEL, ...), or a
 *    negative client-side code (DJINN_E_NULL_ARG, DJINN_E_CONNECT, ...). On failure, outputs are
 *    left untouched and djinn_last_error() describes what went wrong.
 *  - Strings passed in are NUL-terminated UTF-8 and are only read during the call (the library
 *    keeps no pointer to them). A NULL where a string or output is required, or invalid UTF-8,
 *    is an error (DJINN_E_NULL_ARG, DJINN_E_INVALID_UTF8), never a crash.
 *  - One djinn_client is one connection. It may be moved between threads; a call made while
 *    another call is using the same client (from another thread, or from inside that call's token
 *    callback) fails with DJINN_E_CLIENT_BUSY instead of racing. Use one client per thread for
 *    parallel sessions.
 *  - No Rust panic ever crosses this ABI: an internal panic becomes DJINN_E_PANIC.
 *
 * Ownership: a djinn_client created by djinn_connect is owned by the caller and released with
 * djinn_client_free exactly once. Sessions live on the server: close them with
 * djinn_session_close (or leave them to the server's session lease when the connection ends).
 */
#ifndef DJINN_H
#define DJINN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- result codes --------------------------------------------------------------------------- */

/* Success. */
#define DJINN_OK 0

/* 1..=19: the server's status numbers (crates/proto/src/codes.rs, `Status`). */
#define DJINN_E_BAD_FRAME 1
#define DJINN_E_BAD_MAGIC 2
#define DJINN_E_BAD_VERSION 3
#define DJINN_E_UNKNOWN_OPCODE 4
#define DJINN_E_FRAME_TOO_LARGE 5
#define DJINN_E_UNAUTHORIZED 6      /* token rejected */
#define DJINN_E_BAD_HANDLE 7
#define DJINN_E_SHAPE_MISMATCH 8
#define DJINN_E_DTYPE_MISMATCH 9
#define DJINN_E_BAD_ARGUMENT 10     /* prompt too long, id outside the vocabulary, text without a tokenizer */
#define DJINN_E_OUT_OF_MEMORY 11
#define DJINN_E_BUSY 12
#define DJINN_E_SHUTTING_DOWN 13
#define DJINN_E_UNKNOWN_MODEL 14
#define DJINN_E_UNKNOWN_SESSION 15  /* no such session for this tenant */
#define DJINN_E_INTERNAL 16
#define DJINN_E_UNSUPPORTED 17
#define DJINN_E_CANCELLED 18
#define DJINN_E_LIMIT_EXCEEDED 19   /* e.g. more sessions than the server's --max-sessions */
#define DJINN_E_NOT_PAUSED 20       /* resume/read/write of a session not paused at a breakpoint */

/* Negative: found on the client side. */
#define DJINN_E_NULL_ARG (-1)       /* a required pointer argument was NULL */
#define DJINN_E_INVALID_UTF8 (-2)   /* a string argument was not valid UTF-8 */
#define DJINN_E_INVALID_ARG (-3)    /* an argument out of range (unknown mode, ...) */
#define DJINN_E_CONNECT (-4)        /* bad URL, nothing listening, handshake failed */
#define DJINN_E_TRANSPORT (-5)      /* the connection failed after it was established */
#define DJINN_E_PROTOCOL (-6)       /* the server's reply could not be understood */
#define DJINN_E_TOKEN (-7)          /* the token could not be read */
#define DJINN_E_PANIC (-8)          /* a bug inside the library; the client should be freed */
#define DJINN_E_CLIENT (-9)         /* any other client-side failure */
#define DJINN_E_CLIENT_BUSY (-10)   /* the client is in use by another call (see Conventions) */

/* ---- types ---------------------------------------------------------------------------------- */

/* An open connection. Opaque; created by djinn_connect, released by djinn_client_free. */
typedef struct djinn_client djinn_client;

/* Scheduling class hint for a session. */
#define DJINN_QOS_INTERACTIVE 0
#define DJINN_QOS_BATCH 1
#define DJINN_QOS_BACKGROUND 2
#define DJINN_QOS_REALTIME 3

/* What the server reports about a session. */
typedef struct djinn_session_info {
    uint64_t session;          /* the session id (valid for this tenant, across connections) */
    uint32_t context_tokens;   /* tokens already in the session's KV cache */
    uint32_t max_tokens;       /* the session's context limit */
    uint32_t vocab;            /* vocabulary size: valid token ids are 0..vocab-1 */
    uint8_t has_tokenizer;     /* 1 when text prompts and text deltas are available */
    uint8_t has_chat_template; /* 1 when DJINN_INPUT_CHAT is available */
} djinn_session_info;

/* How djinn_generate_text feeds its text. */
#define DJINN_INPUT_RAW 0  /* the text as is, tokenized with no template */
#define DJINN_INPUT_CHAT 1 /* one more user turn through the model's chat template (server side) */

/* Decoding parameters. Initialise with djinn_decode_params_default, then change fields. */
typedef struct djinn_decode_params {
    uint32_t max_new_tokens;  /* default 128 */
    float temperature;        /* 0 = greedy (default) */
    uint32_t top_k;           /* 0 = no cut (default) */
    float top_p;              /* 1 = no cut (default) */
    uint64_t seed;            /* sampling seed (default 0) */
    int32_t ignore_eos;       /* non-zero: keep generating past EOS (default 0) */
    const char *const *stop;  /* stop strings (UTF-8); may be NULL when stop_count is 0 */
    size_t stop_count;
} djinn_decode_params;

/* Why a generation ended. */
#define DJINN_FINISH_EOS 0
#define DJINN_FINISH_LENGTH 1
#define DJINN_FINISH_STOP 2
#define DJINN_FINISH_CANCELLED 3

/* What a generation did. */
typedef struct djinn_generate_result {
    uint32_t prompt_tokens;  /* tokens fed by this call's prefill (0 when nothing was fed) */
    uint32_t tokens;         /* tokens generated and delivered (after a cancel: those the callback saw) */
    uint32_t finish;         /* DJINN_FINISH_*; DJINN_FINISH_CANCELLED whenever the callback cancelled */
    uint32_t context_tokens; /* tokens in the session's KV cache afterwards (a cancel may arrive after the
                                server generated a few more tokens; they are in the cache, not delivered) */
} djinn_generate_result;

/*
 * Called once per generated token, on the calling thread, while djinn_generate_* runs.
 * `text` is the token's text delta: NUL-terminated UTF-8 of `text_len` bytes (possibly empty, e.g.
 * when the model has no tokenizer or the token completes no character yet). `text` is only valid
 * during the call; copy it to keep it. Return 0 to continue, non-zero to cancel the generation
 * (it then ends with DJINN_FINISH_CANCELLED and djinn_generate_* returns DJINN_OK).
 * The callback must not unwind (C++ exceptions, longjmp) through the library. On the same client
 * it may call djinn_bytes_sent / djinn_bytes_received; any other djinn_* call on that client
 * fails with DJINN_E_CLIENT_BUSY (djinn_client_free does nothing then).
 */
typedef int (*djinn_token_cb)(void *user, uint32_t token, const char *text, size_t text_len);

/* ---- functions ------------------------------------------------------------------------------ */

/*
 * The message of the last failed djinn_* call on this thread ("" if none failed yet).
 * Owned by the library: valid until the next djinn_* call on this thread; never free it.
 */
const char *djinn_last_error(void);

/* A static name for a code ("DJINN_E_UNKNOWN_MODEL", "DJINN_OK", "unknown"). Never free it. */
const char *djinn_code_name(int code);

/* The library version ("0.1.0"). Static; never free it. */
const char *djinn_version(void);

/*
 * Connects to `url` (tcp://HOST:PORT or shm://NAME) and completes the handshake.
 * `token`: the tenant token, or NULL to use the DJINN_TOKEN environment variable (none if unset).
 * On success *out receives a new client the caller owns (release it with djinn_client_free).
 */
int djinn_connect(const char *url, const char *token, djinn_client **out);

/*
 * Closes the connection and frees the client. NULL is accepted (no-op). Do not use `client` after.
 * Called while another call is using the client (e.g. from its token callback) it frees nothing
 * and sets djinn_last_error(); free the client after that call returns.
 */
void djinn_client_free(djinn_client *client);

/* Bytes this connection has sent / received so far (0 for NULL). Callable from a token callback. */
uint64_t djinn_bytes_sent(const djinn_client *client);
uint64_t djinn_bytes_received(const djinn_client *client);

/*
 * Opens a session on the server's model `model` with a context of `max_tokens` (0 = the model's
 * maximum) and scheduling class `qos` (DJINN_QOS_*). *out receives its description (out->session
 * is the id for the calls below). The caller owns nothing new on the client side.
 */
int djinn_session_open(djinn_client *client, const char *model, uint32_t qos, uint32_t max_tokens,
                       djinn_session_info *out);

/*
 * Attaches this connection to an existing session of the same tenant (e.g. after a reconnect).
 * `out` may be NULL. DJINN_E_UNKNOWN_SESSION when the tenant has no such session.
 */
int djinn_session_attach(djinn_client *client, uint64_t session, djinn_session_info *out);

/*
 * Feeds `text` into the session (`mode`: DJINN_INPUT_RAW or DJINN_INPUT_CHAT), then generates,
 * calling `cb` (may be NULL) with each token. `params` may be NULL (defaults); `out` may be NULL.
 * An empty `text` in DJINN_INPUT_RAW mode feeds nothing and continues the generation.
 */
int djinn_generate_text(djinn_client *client, uint64_t session, uint32_t mode, const char *text,
                        const djinn_decode_params *params, djinn_token_cb cb, void *user,
                        djinn_generate_result *out);

/*
 * Feeds `n_ids` token ids into the session as is (no template), then generates like
 * djinn_generate_text. `ids` may be NULL only when n_ids is 0 (continue without new input).
 */
int djinn_generate_ids(djinn_client *client, uint64_t session, const uint32_t *ids, size_t n_ids,
                       const djinn_decode_params *params, djinn_token_cb cb, void *user,
                       djinn_generate_result *out);

/* ---- breakpoints ----------------------------------------------------------------------------
 * A pause of the input pass after layer `layer` (1..=L; L = the residual stream before the final
 * norm). The handle is valid only during the pause callback. The hidden state is
 * [tokens, hidden] f32, row-major. */
typedef struct djinn_pause djinn_pause;

/* Called at each pause. Return 0 to resume (with the state as it is now), non-zero to cancel:
 * the request then ends cancelled and the session is as it was before it. */
typedef int (*djinn_pause_cb)(void *user, djinn_pause *pause, uint32_t layer, uint32_t tokens, uint32_t hidden);

/* As djinn_generate_ids, with the input pass (the n_ids ids, at least one, fed in one pass)
 * pausing after each of the n_layers increasing `layers`. pause_cb NULL resumes at once. The
 * client is busy during the call: inside the callbacks use only djinn_pause_read/write. */
int djinn_generate_ids_breakpoints(djinn_client *client, uint64_t session, const uint32_t *ids, size_t n_ids,
                                   const uint32_t *layers, size_t n_layers, const djinn_decode_params *params,
                                   djinn_token_cb cb, djinn_pause_cb pause_cb, void *user,
                                   djinn_generate_result *out);

/* A prefill of the n_ids ids (at least one) whose pass pauses after each of the n_layers
 * increasing `layers`, as djinn_generate_ids_breakpoints. Its pass feeds every id, the last
 * included (states are [tokens, hidden] over all of them, led by a token an earlier call left
 * pending), and the session keeps the last token's state: the next djinn_generate_ids with no
 * ids samples its first token from it. *context_tokens (may be NULL) receives the session's
 * length after the prefill. A cancel rolls the prefill back (DJINN_E_CANCELLED). */
int djinn_prefill_ids_breakpoints(djinn_client *client, uint64_t session, const uint32_t *ids, size_t n_ids,
                                  const uint32_t *layers, size_t n_layers, djinn_pause_cb pause_cb, void *user,
                                  uint32_t *context_tokens);

/* Copies the paused hidden state into out (n = tokens * hidden floats). */
int djinn_pause_read(djinn_pause *pause, float *out, size_t n);

/* Replaces the paused hidden state with n = tokens * hidden floats; the server refuses another
 * shape (DJINN_E_SHAPE_MISMATCH). */
int djinn_pause_write(djinn_pause *pause, const float *values, size_t n);

/* Closes the session on the server, freeing its KV cache. The id is invalid afterwards. */
int djinn_session_close(djinn_client *client, uint64_t session);

/* Fills *params with the defaults (128 tokens, greedy, no stop strings). */
void djinn_decode_params_default(djinn_decode_params *params);

#ifdef __cplusplus
}
#endif

#endif /* DJINN_H */
