//! The token callback's adapter: forwards each decoded token to C's [`DjinnTokenCb`] with a
//! NUL-terminated copy of its text, counts what was delivered, and remembers whether C cancelled,
//! so the [`DjinnGenerateResult`] reports what C saw. Every generating entry point uses it.

use super::*;

/// Forwards token events to a C callback; one per generate call.
pub(crate) struct TokenForwarder {
    cb: DjinnTokenCb,
    user: *mut c_void,
    /// One reused buffer gives the callback a NUL-terminated copy of each delta.
    text_buf: Vec<u8>,
    delivered: u32,
    cancelled: bool,
}

impl TokenForwarder {
    /// # Safety
    /// `cb`, when set, is safe to call with `user` for as long as this forwarder lives.
    pub(crate) unsafe fn new(cb: DjinnTokenCb, user: *mut c_void) -> Self {
        Self { cb, user, text_buf: Vec::with_capacity(64), delivered: 0, cancelled: false }
    }

    /// Hands one token to C; false when C asked to stop.
    pub(crate) fn on_token(&mut self, ev: &TokenEvent<'_>) -> bool {
        self.delivered += 1;
        let Some(f) = self.cb else { return true };
        self.text_buf.clear();
        self.text_buf.extend_from_slice(ev.text.as_bytes());
        self.text_buf.push(0);
        // SAFETY: `new`'s caller vouches for `f` and `user`; `text_buf` is NUL-terminated, holds
        // `ev.text.len()` bytes before the NUL and outlives the call (the header says the pointer
        // is only valid during the callback).
        let rc = unsafe { f(self.user, ev.token, self.text_buf.as_ptr().cast(), ev.text.len()) };
        self.cancelled = rc != 0;
        !self.cancelled
    }

    /// Writes the call's result to `out` when it is not NULL. A cancel races with the server's
    /// own end: the callback's decision is what C sees.
    ///
    /// # Safety
    /// `out` is NULL or writable for one `djinn_generate_result`.
    pub(crate) unsafe fn write_result(&self, summary: &DecodeSummary, out: *mut DjinnGenerateResult) {
        if out.is_null() {
            return;
        }
        let r = DjinnGenerateResult {
            prompt_tokens: summary.prompt_tokens,
            tokens: if self.cancelled { self.delivered } else { summary.tokens },
            finish: if self.cancelled { DJINN_FINISH_CANCELLED } else { finish_to_c(summary.finish) },
            context_tokens: summary.context_tokens,
        };
        // SAFETY: non-NULL and writable per the contract; write() needs no initialised value.
        unsafe { out.write(r) };
    }
}
