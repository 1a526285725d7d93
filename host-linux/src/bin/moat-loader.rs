//! The sandboxed picoprocess loader of host-linux. Started by the monitor
//! only; not meant to be run by hand.
fn main() {
    moat_host_linux::loader::main()
}
