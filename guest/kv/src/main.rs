//! Built-in guest `kv`, nvhv's default guest: a Redis-compatible key-value
//! store (`nvhv-kvstore`) served over virtio-vsock on [`KV_VSOCK_PORT`]; the
//! VMM forwards the host connections of `--listen` to it, so `redis-cli` and
//! `redis-benchmark` talk to it. All its data lives in guest RAM, which nvhv
//! makes persistent: there is no persistence code here.
//!
//! Only vCPU 0 serves; other vCPUs park at the wait port for good.
//!
//! The main loop never exits to the VMM while there is work: it polls the
//! vsock used rings in guest memory ([`vsock`]), feeds requests to the store
//! and queues replies ([`server`]); a queue-notify register write happens
//! only when the device asks for one through `avail_event` (it suppresses
//! them while it polls). After [`IDLE_US`] without any progress (at once when
//! the VMM says it holds our output until an epoch commits) it parks at
//! the wait port ([`nvhv_rt::wait`], one exit) for at most [`WAIT_US`]; the
//! device wakes it when a packet arrives. Expired keys are reclaimed every
//! [`HOUSEKEEPING_MS`], busy or idle. Nothing is printed per request (each
//! serial byte is an exit).
//!
//! The one nvhv-specific step: the store's state version and each
//! connection's dependency are registered with the VMM and published before
//! each reply ([`server::OUTPUT_DEPS`]), so that in epoch mode a reply that
//! shows only committed data goes out at once instead of waiting for the
//! next commit.
#![no_std]
#![no_main]

extern crate alloc;

mod hal;
mod server;
mod vsock;

use nvhv_kvstore::Store;
use nvhv_rt::abi::KV_VSOCK_PORT;
use nvhv_rt::{println, tsc, BootInfo};
use virtio_drivers::transport::mmio::MmioTransport;

use server::State;
use vsock::Vsock;

/// Poll this long without progress before parking at the wait port.
const IDLE_US: u64 = 100;
/// Longest park (so housekeeping and expiry still run when idle).
const WAIT_US: u32 = 100_000;
/// Period of housekeeping: active expiry, close timeouts, credit retries.
const HOUSEKEEPING_MS: u64 = 100;
/// Received packets handled per loop iteration before replies are sent.
const RX_BATCH: usize = 64;
/// Keys examined per `expire_some` call, and the time cap of one expiry run.
const EXPIRE_BUDGET: usize = 64;
const EXPIRE_MAX_US: u64 = 1000;
/// Heap kept out of the store's memory limit for connection buffers, packet
/// buffers and the store's own overheads: 10% plus this.
const HEAP_RESERVE: usize = 4 << 20;

fn main(info: &'static BootInfo, vcpu: u32) -> ! {
    if vcpu != 0 {
        loop {
            nvhv_rt::wait(nvhv_rt::abi::WAIT_FOREVER);
        }
    }
    let mut transport = match vsock::probe(info) {
        Ok(t) => t,
        Err(e) => {
            println!("kv: {e}; stopping");
            nvhv_rt::exit(1)
        }
    };
    // Queue sizes are const generics of the rings: pick the largest the
    // device allows.
    match vsock::max_data_queue_size(&mut transport) {
        m if m >= 128 => run::<128>(info, transport),
        m if m >= 32 => run::<32>(info, transport),
        _ => run::<8>(info, transport),
    }
}

/// The store's memory limit for `free` heap bytes: 90% of them minus
/// [`HEAP_RESERVE`] (half of them on a tiny heap).
fn mem_limit(free: usize) -> usize {
    let limit = (free / 10 * 9).saturating_sub(HEAP_RESERVE);
    if limit < free / 4 {
        free / 2
    } else {
        limit
    }
}

fn run<const Q: usize>(info: &'static BootInfo, transport: MmioTransport<'static>) -> ! {
    let mut dev = match Vsock::<Q>::new(transport) {
        Ok(d) => d,
        Err(e) => {
            println!("kv: virtio-vsock initialisation failed: {e}");
            nvhv_rt::exit(1)
        }
    };
    if !dev.event_idx() {
        println!("kv: warning: the vsock device does not offer VIRTIO_F_EVENT_IDX");
    }
    let heap = nvhv_rt::heap_free_bytes();
    let store = Store::new(info.seed, mem_limit(heap));
    let mut st = State::new(dev.cid(), store, info.seed);
    // Replies to reads of committed data need not wait for an epoch.
    server::OUTPUT_DEPS.publish(st.store.version());
    server::OUTPUT_DEPS.register();
    println!(
        "kv: listening on vsock port {KV_VSOCK_PORT} (heap {} MiB)",
        heap >> 20
    );

    let ticks_per_us = (info.tsc_khz / 1000).max(1);
    let idle_ticks = IDLE_US * ticks_per_us;
    let mut last_busy = tsc();
    let mut next_housekeeping = 0u64;
    loop {
        // Unix time, like Redis: TTLs keep running while the VM is suspended,
        // and EXPIREAT/EXAT take Unix timestamps.
        let now_ms = nvhv_rt::unix_time_ns() / 1_000_000;
        let mut busy = dev.reclaim_tx() > 0;
        if dev.poll_events() {
            st.transport_reset(dev.cid());
            busy = true;
        }
        busy |= dev.poll_rx(RX_BATCH, |h, p| st.on_packet(h, p, now_ms)) > 0;
        busy |= st.flush(&mut dev, now_ms) > 0;
        // `next - now > period`: the clock went backwards; do not stall.
        if now_ms >= next_housekeeping || next_housekeeping - now_ms > HOUSEKEEPING_MS {
            st.housekeeping(&mut dev, now_ms);
            expire(&mut st.store, now_ms, ticks_per_us);
            next_housekeeping = now_ms + HOUSEKEEPING_MS;
        }
        dev.kick_tx();
        let t = tsc();
        if busy {
            last_busy = t;
        } else if t.wrapping_sub(last_busy) >= idle_ticks || nvhv_rt::output_held() {
            // Idle: park. At once when the VMM holds our replies until an
            // epoch commits (polling cannot bring the next request sooner,
            // and a parked guest lets the commit start without a kick).
            nvhv_rt::wait(WAIT_US);
            last_busy = tsc();
        }
    }
}

/// Active expiry, like Redis's: sample keys with a TTL and delete the due
/// ones; go on while more than a quarter of a sample was due, for at most
/// [`EXPIRE_MAX_US`].
fn expire(store: &mut Store, now_ms: u64, ticks_per_us: u64) {
    if store.expires_len() == 0 {
        return;
    }
    let start = tsc();
    loop {
        let deleted = store.expire_some(now_ms, EXPIRE_BUDGET);
        if deleted * 4 <= EXPIRE_BUDGET || tsc().wrapping_sub(start) >= EXPIRE_MAX_US * ticks_per_us
        {
            break;
        }
    }
}

nvhv_rt::entry!(main);
