//! The Rust-client baseline of `python/bench/decode_overhead.py`: `reps` generate requests on
//! fresh sessions of `model` at `url`, each feeding `prompt` ids and decoding `new_tokens`
//! greedy tokens (EOS ignored), timed from submission to the final frame; prints one JSON
//! object: `{"per_step_us": [..]}` (one value per request: elapsed / new_tokens).
//!
//! Usage: decode_steps URL MODEL NEW_TOKENS REPS ID [ID ...]

use std::time::Instant;

use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        return Err("usage: decode_steps URL MODEL NEW_TOKENS REPS ID [ID ...]".into());
    }
    let (url, model) = (&args[0], &args[1]);
    let new_tokens: u32 = args[2].parse()?;
    let reps: usize = args[3].parse()?;
    let prompt: Vec<u32> = args[4..].iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let mut c = Client::connect_with(url, &ClientOptions::default())?;
    let opts = DecodeOptions { max_new_tokens: new_tokens, ignore_eos: true, ..DecodeOptions::default() };
    let mut per_step_us = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = c.open_session(&OpenOptions::new(model.as_str()))?.session;
        let mut n = 0u32;
        let t0 = Instant::now();
        // The callback does what the Python iterator does per token: keep the id and the text.
        let mut last = (0u32, String::new());
        c.generate(s, Feed::Ids(&prompt), &opts, |ev| {
            last = (ev.token, ev.text.to_owned());
            n += 1;
            true
        })?;
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
