//! Tests of the limits a contract applies and of block geometry.

use super::*;

#[test]
fn limits_are_clamped() {
    let l = ContractLimits {
        max_io: u32::MAX,
        deadline: ms(1),
        max_in_flight: 0,
    };
    let c = BlockContract::new(l);
    assert_eq!(c.limits().max_io, MAX_PAYLOAD);
    assert_eq!(c.limits().max_in_flight, 1);
    assert_eq!(
        ContractLimits::default().effective(),
        ContractLimits::default()
    );
    let g = GenericContract::new(limits(), u32::MAX);
    assert_eq!(g.max_response(), MAX_PAYLOAD);
}

#[test]
fn geometry_rules() {
    assert_eq!(
        Geometry::new(512, 512),
        Ok(Geometry {
            capacity: 512,
            block_size: 512
        })
    );
    assert!(Geometry::new(65536, 65536).is_ok());
    assert!(Geometry::new(MAX_CAPACITY, 4096).is_ok());
    for bs in [0, 1, 256, 511, 513, 1000, 131072, 1 << 40, u64::MAX] {
        assert_eq!(
            Geometry::new(1 << 20, bs),
            Err(InfoProblem::BlockSize(bs)),
            "block size {bs}"
        );
    }
    for cap in [0, 511, 513, 4096 + 512, MAX_CAPACITY + 4096, u64::MAX] {
        assert_eq!(
            Geometry::new(cap, 4096),
            Err(InfoProblem::Capacity {
                capacity: cap,
                block_size: 4096
            }),
            "capacity {cap}"
        );
    }
    let g = geo();
    assert_eq!(Geometry::parse(&g.encode()), Ok(g));
    assert_eq!(g.blocks(), 64);
    assert_eq!(
        Geometry {
            capacity: 5,
            block_size: 0
        }
        .blocks(),
        0
    );
    assert_eq!(g.to_string(), "32768 bytes in blocks of 512 bytes");
}
