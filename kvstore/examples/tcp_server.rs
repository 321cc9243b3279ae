//! A host-side TCP front end for trying the engine with the real
//! `redis-cli` and `redis-benchmark` (not used by the guest):
//!
//! ```text
//! cargo run --release -p nvhv-kvstore --example tcp_server -- 127.0.0.1:7379 [MEM_LIMIT_BYTES]
//! redis-benchmark -p 7379 -t set,get -n 100000 -q
//! ```
//!
//! One thread per connection around a mutex-protected store; a background
//! thread runs the active expiry.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvhv_kvstore::{feed, Conn, Store};

fn serve(mut stream: TcpStream, store: Arc<Mutex<Store>>, start: Instant) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut conn = Conn::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.clear();
        {
            let mut store = store.lock().expect("store lock");
            let now = start.elapsed().as_millis() as u64;
            feed(&mut store, &mut conn, &buf[..n], now, &mut out);
        }
        stream.write_all(&out)?;
        if conn.closing() {
            return Ok(());
        }
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:7379".into());
    let limit = args
        .next()
        .map_or(usize::MAX, |s| s.parse().expect("MEM_LIMIT_BYTES"));
    let listener = TcpListener::bind(&addr)?;
    eprintln!("nvhv-kvstore listening on {addr}");
    let start = Instant::now();
    let store = Arc::new(Mutex::new(Store::new(
        start.elapsed().as_nanos() as u64 ^ 0x9e37,
        limit,
    )));
    let expiry = Arc::clone(&store);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = start.elapsed().as_millis() as u64;
        expiry.lock().expect("store lock").expire_some(now, 200);
    });
    for stream in listener.incoming() {
        let stream = stream?;
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let _ = serve(stream, store, start);
        });
    }
    Ok(())
}
