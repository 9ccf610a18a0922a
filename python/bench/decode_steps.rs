//! The Rust-client baseline of `python/bench/decode_overhead.py`: `reps` generate requests on
//! fresh sessions of `model` at `url`, each feeding `prompt` ids and decoding `new_tokens`
//! greedy tokens (EOS ignored). Mode `e2e`: timed from submission to the final frame (the
//! server computes while the client reads). Mode `drain`: the request is started, the client
//! sleeps until the server has sent every token, then reading them all is timed (the client's
//! own cost per token, nothing of the server's). Prints one JSON object:
//! `{"per_step_us": [..]}` (one value per request: elapsed / new_tokens).
//!
//! Usage: decode_steps URL MODEL NEW_TOKENS REPS e2e|drain ID [ID ...]

use std::time::{Duration, Instant};

use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions, StreamEvent};

/// Long enough for the server to send every token of a drain-mode request before it is read.
const DRAIN_WAIT: Duration = Duration::from_millis(30);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        return Err("usage: decode_steps URL MODEL NEW_TOKENS REPS e2e|drain ID [ID ...]".into());
    }
    let (url, model) = (&args[0], &args[1]);
    let new_tokens: u32 = args[2].parse()?;
    let reps: usize = args[3].parse()?;
    let drain = match args[4].as_str() {
        "e2e" => false,
        "drain" => true,
        m => return Err(format!("mode {m:?}: e2e or drain").into()),
    };
    let prompt: Vec<u32> = args[5..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let mut c = Client::connect_with(url, &ClientOptions::default())?;
    let opts = DecodeOptions { max_new_tokens: new_tokens, ignore_eos: true, ..DecodeOptions::default() };
    let mut per_step_us = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = c.open_session(&OpenOptions::new(model.as_str()))?.session;
        let mut n = 0u32;
        // Per token, what the Python iterator does: keep the id and an owned copy of the text.
        let mut last = (0u32, String::new());
        let t0 = if drain {
            let mut stream = c.generate_start(s, Feed::Ids(&prompt), &opts)?;
            std::thread::sleep(DRAIN_WAIT);
            let t0 = Instant::now();
            while let StreamEvent::Token(ev) = c.stream_next(&mut stream)? {
                last = (ev.token, ev.text.to_owned());
                n += 1;
            }
            t0
        } else {
            let t0 = Instant::now();
            c.generate(s, Feed::Ids(&prompt), &opts, |ev| {
                last = (ev.token, ev.text.to_owned());
                n += 1;
                true
            })?;
            t0
        };
        let us = t0.elapsed().as_secs_f64() * 1e6;
        std::hint::black_box(&last);
        c.close_session(s)?;
        assert_eq!(n, new_tokens, "decoded {n} of {new_tokens} tokens");
        per_step_us.push(us / f64::from(new_tokens));
    }
    let list: Vec<String> = per_step_us.iter().map(|v| format!("{v:.3}")).collect();
    println!("{{\"per_step_us\": [{}]}}", list.join(", "));
    Ok(())
}
