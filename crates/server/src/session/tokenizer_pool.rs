//! Tokenization off the engine loop: a bounded pool of worker threads turns a request's text (raw
//! text, or chat turns through the model's template) into token ids while the loop keeps
//! stepping every other session.
//!
//! The loop hands a job the session's [`Conversation`] (moved out: the session is busy
//! tokenizing and takes no other request until the job comes back) and a copy of its ids; a
//! worker renders and tokenizes only the new turn's text (see [`super::chat`]) and puts the
//! result, the conversation with it, on the session queue's `tokenized` list, waking the loop.
//!
//! Bounds: `tokenize_workers` threads; `tokenize_queue_max` jobs wait for them, more are refused
//! `Busy` by the loop (never queued without bound). A result is always delivered (the loop drops
//! it when the session is gone), so a session never stays busy.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use djinn_model::TextTokenizer;

use super::chat::{Conversation, TurnIds};
use super::SessionService;

/// What a job tokenizes.
pub(crate) enum TextInput {
    /// Text without a template; `special`: the tokenizer's own BOS/EOS post-processing (only at
    /// the start of a session).
    Raw { text: String, special: bool },
    /// Chat turns (role, text) appended to the conversation; `reply`: with the generation prompt
    /// after the last (a decode answers them), none for a system turn appended on its own (else
    /// the prompt would stand stray before the user turn that follows it).
    Turns { turns: Vec<(String, String)>, reply: bool },
}

pub(crate) struct TokenizeJob {
    pub session: u64,
    /// Matches the result to the work that asked for it.
    pub ticket: u64,
    pub tok: Arc<TextTokenizer>,
    pub input: TextInput,
    /// The session's conversation, moved here while the job runs (given back in the result).
    pub conv: Conversation,
    /// The ids the session holds (the KV's, generated ones included).
    pub held: Vec<u32>,
}

pub(crate) struct TokenizeDone {
    pub session: u64,
    pub ticket: u64,
    pub conv: Conversation,
    pub result: Result<TurnIds, String>,
}

/// The job queue is full (`tokenize_queue_max`), or the workers are gone.
pub(crate) struct PoolFull(pub Box<TokenizeJob>);

pub(crate) struct TokenizerPool {
    tx: Option<SyncSender<TokenizeJob>>,
    workers: Vec<JoinHandle<()>>,
    queue_max: usize,
}

impl TokenizerPool {
    /// Starts `workers` threads (at least one) behind a queue of `queue_max` jobs; results go to
    /// `svc`'s queue.
    pub(crate) fn start(workers: usize, queue_max: usize, svc: Weak<SessionService>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<TokenizeJob>(queue_max);
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(workers.max(1));
        for i in 0..workers.max(1) {
            let (rx, svc) = (rx.clone(), svc.clone());
            handles.push(std::thread::Builder::new().name(format!("djinn-tok-{i}")).spawn(move || work(&rx, &svc))?);
        }
        Ok(TokenizerPool { tx: Some(tx), workers: handles, queue_max })
    }

    pub(crate) fn queue_max(&self) -> usize {
        self.queue_max
    }

    /// Queues `job`; refused (the job handed back) when `tokenize_queue_max` jobs wait.
    pub(crate) fn submit(&self, job: TokenizeJob) -> Result<(), PoolFull> {
        let tx = self.tx.as_ref().expect("the sender lives until drop");
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(j) | TrySendError::Disconnected(j) => PoolFull(Box::new(j)),
        })
    }
}

impl Drop for TokenizerPool {
    fn drop(&mut self) {
        // Closing the channel ends each worker after its current job.
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work(rx: &Mutex<Receiver<TokenizeJob>>, svc: &Weak<SessionService>) {
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let done = run(job);
        match svc.upgrade() {
            Some(svc) => svc.tokenized(done),
            None => return,
        }
    }
}

/// One job: the ids of the input (the turns recorded in the conversation when they tokenize).
pub(crate) fn run(job: TokenizeJob) -> TokenizeDone {
    let TokenizeJob { session, ticket, tok, input, mut conv, held } = job;
    let result = match input {
        TextInput::Raw { text, special } => {
            tok.encode(&text, special).map(|ids| TurnIds { ids, turns: 0 }).map_err(|e| e.to_string())
        }
        TextInput::Turns { turns, reply } => {
            let turns: Vec<(&str, &str)> = turns.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
            conv.new_turns(&tok, &held, &turns, reply)
        }
    };
    TokenizeDone { session, ticket, conv, result }
}
