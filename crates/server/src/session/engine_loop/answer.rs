//! Where a job's answer goes ([`Answer`]: queued on the connection's outbound queue, never sent
//! by the loop itself) and why a job was refused ([`Refusal`], the status of a model error).

use super::*;

/// Where a job's answer goes; holds the job "in progress" until dropped.
pub(super) struct Answer {
    pub(super) conn: Arc<ConnLink>,
    pub(super) rid: u64,
    pub(super) opcode: Opcode,
    pub(super) received: Instant,
    _guard: ActiveGuard,
}

impl Answer {
    pub(super) fn from_job(job: Job) -> (Answer, Request, TenantId) {
        let Job { conn, rid, opcode, tenant, req, received, guard } = job;
        (Answer { conn, rid, opcode, received, _guard: guard }, req, tenant)
    }

    /// Queues the frame for the connection's writer (never blocks on the peer); returns its
    /// wire bytes, 0 when the connection is gone.
    pub(super) fn send(&self, opcode: Opcode, status: Status, meta: &[u8], data: &[&[u8]]) -> usize {
        if !self.conn.is_alive() {
            return 0;
        }
        let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
        let mut header = FrameHeader::new(opcode.as_u16(), FLAG_REPLY, self.rid, meta.len() as u32, data_len);
        header.status = status.as_u16().into();
        let n = header.frame_len() as usize;
        match Outbound::push(&self.conn, header, meta, data) {
            Ok(()) => n,
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
    }

    pub(super) fn err(self, status: Status, message: impl Into<String>) {
        let msg = ErrorReply::new(message);
        self.send(self.opcode, status, msg.encode_bytes(), &[]);
    }
}

/// Why a job was refused.
pub(super) struct Refusal(pub(super) Status, pub(super) String);

impl Refusal {
    pub(super) fn new(status: Status, msg: impl Into<String>) -> Self {
        Refusal(status, msg.into())
    }
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
