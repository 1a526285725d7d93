use moat_host_linux::{LogSink, Sandbox, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;
fn main() {
    let img = std::env::args().nth(1).unwrap();
    let mut v = vec![];
    for _ in 0..50 {
        let seen: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let s2 = seen.clone();
        let sink = LogSink::Callback(Arc::new(move |_l: &str| {
            s2.lock().unwrap().get_or_insert_with(Instant::now);
        }));
        let t = Instant::now();
        let mut p = Sandbox::new(&img)
            .stdout(Stdio::Null)
            .log(sink)
            .spawn()
            .unwrap();
        let ts = t.elapsed();
        let _ = p.wait().unwrap();
        let tt = t.elapsed();
        let tf = seen.lock().unwrap().unwrap() - t;
        v.push((ts.as_micros(), tf.as_micros(), tt.as_micros()));
    }
    v.sort_by_key(|x| x.1);
    println!(
        "spawn-returned/first-call/total µs (median by first): {:?}",
        v[v.len() / 2]
    );
}
