//! `moat-vmm`: the KVM host's VMM process, started by the monitor for each
//! picoprocess on `--host kvm` (see `moat_host_hypervisor::vmm`).
fn main() {
    moat_host_hypervisor::vmm::main()
}
