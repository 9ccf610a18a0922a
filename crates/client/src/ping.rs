//! perftest-style round trips: one request in flight, a payload echoed back, RTTs in an HDR
//! histogram (microsecond percentiles with three significant digits).

use std::time::Instant;

use djinn_proto::Opcode;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{Client, ClientError, Result};

#[derive(Clone, Debug, Serialize)]
pub struct RttUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub min: f64,
    pub max: f64,
}

/// The JSON object `djinn-dataplane ping --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct PingReport {
    pub transport: String,
    pub size: u64,
    pub count: u64,
    pub rtt_us: RttUs,
    /// size × count / elapsed seconds / 1e9, one direction.
    pub gbps: f64,
}

/// Runs `warmup` untimed then `count` timed round trips of a `size`-byte payload. The echo
/// lands in one buffer allocated before the clock starts ([`Client::wait_into`]): the timed loop
/// allocates nothing, so `gbps` shows the transport, not the allocator.
pub fn run(client: &mut Client, size: usize, count: u64, warmup: u64) -> Result<PingReport> {
    let payload: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
    let mut echo = vec![0u8; size];
    let send = |client: &mut Client| client.submit(Opcode::Ping, &[], &[&payload]);
    let claim = |client: &mut Client, id: u64, echo: &mut Vec<u8>| -> Result<()> {
        client.wait_into(id, echo)?;
        if echo.len() != size {
            return Err(ClientError::Protocol {
                opcode: "Ping",
                why: format!("echoed {} of {size} bytes", echo.len()),
            });
        }
        Ok(())
    };
    for _ in 0..warmup {
        let id = send(client)?;
        claim(client, id, &mut echo)?;
    }
    if warmup > 0 && echo != payload {
        return Err(ClientError::Protocol { opcode: "Ping", why: "echo differs from the payload".into() });
    }
    // 1 ns .. 1000 s, 3 significant digits.
    let mut hist = Histogram::<u64>::new_with_bounds(1, 1_000_000_000_000, 3).expect("static histogram bounds");
    // One clock read per round trip, as perftest takes one cycle count per iteration, taken just
    // after a request goes out: a sample is the time from one request's send to the next's, one
    // whole round trip, and the read and the histogram's record happen while the request is in
    // flight instead of between a reply and the next request. (Each read is an emulated `rdtsc`
    // plus the vDSO's arithmetic in the RDMA VM, a few hundred nanoseconds.) One request more
    // than `count` is sent, so every timed sample ends at a send; its reply is claimed untimed.
    let mut id = send(client)?;
    let start = Instant::now();
    let mut t = start;
    for _ in 0..count {
        claim(client, id, &mut echo)?;
        id = send(client)?;
        let now = Instant::now();
        hist.saturating_record(((now - t).as_nanos() as u64).max(1));
        t = now;
    }
    claim(client, id, &mut echo)?;
    let elapsed_s = (t - start).as_secs_f64();
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(PingReport {
        transport: client.transport().to_owned(),
        size: size as u64,
        count,
        rtt_us: RttUs {
            p50: us(hist.value_at_quantile(0.5)),
            p99: us(hist.value_at_quantile(0.99)),
            p999: us(hist.value_at_quantile(0.999)),
            min: us(if count > 0 { hist.min() } else { 0 }),
            max: us(hist.max()),
        },
        gbps: if elapsed_s > 0.0 { size as f64 * count as f64 / elapsed_s / 1e9 } else { 0.0 },
    })
}
