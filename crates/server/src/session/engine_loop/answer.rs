//! Where a job's answer goes ([`Answer`]: queued on the connection's outbound queue, never sent
//! by the loop itself) and why a job was refused ([`Refusal`], the status of a model error).

use super::*;

/// Where a job's answer goes; holds the job "in progress" until dropped.
pub(super) struct Answer {
    pub(super) conn: Arc<ConnLink>,
    pub(super) rid: u64,
    pub(super) opcode: Opcode,
    pub(super) received: Instant,
    /// For the request's log line.
    tenant: TenantId,
    /// Its end-to-end time (`djinn_session_request_duration_seconds` of its opcode).
    duration_s: prometheus::Histogram,
    _guard: ActiveGuard,
}

impl Answer {
    pub(super) fn from_job(job: Job, meters: &mut RequestMeters) -> (Answer, Request, TenantId) {
        let Job { conn, rid, opcode, tenant, req, received, guard } = job;
        let duration_s = meters.get(opcode);
        (Answer { conn, rid, opcode, received, tenant: tenant.clone(), duration_s, _guard: guard }, req, tenant)
    }

    /// The one log line of a finished session request (target `djinn::request`).
    fn log_done(&self, status: Status, model: &str, tokens: u32) {
        let elapsed = self.received.elapsed();
        self.duration_s.observe(elapsed.as_secs_f64());
        let duration_us = elapsed.as_micros() as u64;
        let (tenant, opcode, status) = (&self.tenant, self.opcode.name(), status.name());
        tracing::info!(target: "djinn::request", %tenant, model, opcode, tokens, duration_us, status, "request");
    }

    /// Queues the frame for the connection's writer (never blocks on the peer); returns its
    /// wire bytes, 0 when the connection is gone.
    pub(super) fn send(&self, opcode: Opcode, status: Status, meta: &[u8], data: &[&[u8]]) -> usize {
        self.send_then(opcode, status, meta, data, false)
    }

    /// [`Answer::send`]; `more`: this answer's next frame is pushed right after (see
    /// [`Outbound::push_then`]).
    pub(super) fn send_then(&self, opcode: Opcode, status: Status, meta: &[u8], data: &[&[u8]], more: bool) -> usize {
        if !self.conn.is_alive() {
            return 0;
        }
        let header = self.header(opcode, status, meta, data.iter().map(|d| d.len() as u64).sum());
        self.pushed(Outbound::push_then(&self.conn, header, meta, data, more), &header)
    }

    /// A successful answer whose bulk data is in staging chunks: sent from them, not copied
    /// (see [`Outbound::push_staged`]).
    pub(super) fn ok_staged(self, meta: &[u8], data: crate::staging::Staged) {
        if self.conn.is_alive() {
            let header = self.header(self.opcode, Status::Ok, meta, data.len() as u64);
            self.pushed(Outbound::push_staged(&self.conn, header, meta, data), &header);
        }
        self.log_done(Status::Ok, "-", 0);
    }

    /// The header of one of this answer's frames.
    fn header(&self, opcode: Opcode, status: Status, meta: &[u8], data_len: u64) -> FrameHeader {
        let mut header = FrameHeader::new(opcode.as_u16(), FLAG_REPLY, self.rid, meta.len() as u32, data_len);
        header.status = status.as_u16().into();
        header
    }

    /// What the push of the frame with `header` did: its wire bytes, 0 when it was not queued.
    fn pushed(&self, r: Result<(), PushError>, header: &FrameHeader) -> usize {
        match r {
            Ok(()) => header.frame_len() as usize,
            Err(PushError::Full) => {
                // Past the hard bound the client has long stopped reading: give up on it (its
                // sessions keep their lease).
                tracing::debug!(conn = self.conn.id, "outbound queue at its hard bound; closing the connection");
                self.conn.close_now();
                0
            }
            // Gone already (its writer failed or could not start).
            Err(PushError::Closed) => 0,
        }
    }

    pub(super) fn ok(self, meta: &[u8], data: &[&[u8]]) {
        self.send(self.opcode, Status::Ok, meta, data);
        self.log_done(Status::Ok, "-", 0);
    }

    /// A decode's final frame: `tokens` generated on `model`.
    pub(super) fn ok_decode(self, meta: &[u8], model: &str, tokens: u32) {
        self.send(self.opcode, Status::Ok, meta, &[]);
        self.log_done(Status::Ok, model, tokens);
    }

    pub(super) fn err(self, status: Status, message: impl Into<String>) {
        let msg = ErrorReply::new(message);
        self.send(self.opcode, status, msg.encode_bytes(), &[]);
        self.log_done(status, "-", 0);
    }
}

/// `djinn_session_request_duration_seconds{opcode}`, each opcode's series resolved on its first
/// request and kept by the loop.
pub(super) struct RequestMeters {
    vec: prometheus::HistogramVec,
    by_op: ByOpcode<prometheus::Histogram>,
}

impl RequestMeters {
    pub(super) fn new(metrics: &Metrics) -> RequestMeters {
        RequestMeters { vec: metrics.session_request_duration_s.clone(), by_op: ByOpcode::new() }
    }

    fn get(&mut self, op: Opcode) -> prometheus::Histogram {
        let vec = &self.vec;
        self.by_op.get(op, |label| vec.with_label_values(&[label])).clone()
    }
}

/// Why a job was refused.
pub(super) struct Refusal(pub(super) Status, pub(super) String);

impl Refusal {
    pub(super) fn new(status: Status, msg: impl Into<String>) -> Self {
        Refusal(status, msg.into())
    }
}

/// KV bytes a session of `tokens` tokens occupies at most (whole blocks), for the tenant quota.
pub(super) fn kv_bytes<B: Backend>(engine: &Engine<B>, tokens: usize) -> u64 {
    let layout = engine.vmu().layout();
    (tokens.div_ceil(layout.block_tokens) * layout.block_bytes()) as u64
}

pub(super) fn model_status(e: &ModelError) -> Status {
    match e {
        ModelError::TokenId { .. } | ModelError::TooLong { .. } | ModelError::Batch(_) => Status::BadArgument,
        ModelError::Vmu(VmuError::KvExhausted { .. } | VmuError::AdmissionRefused { .. }) => Status::OutOfMemory,
        ModelError::Vmu(VmuError::TooManySessions { .. }) => Status::LimitExceeded,
        ModelError::Tokenizer { .. } | ModelError::Template(_) | ModelError::NoTokenizer { .. } => Status::BadArgument,
        _ => Status::Internal,
    }
}
