//! P5 and P6: the tower layer. `distlock-tower`'s `LockLayer` is being written
//! on its own branch; until it lands, these rows are reported as pending.

use crate::report::Row;

const WHY: &str = "pending the tower layer";

pub(crate) fn p5_p6() -> Vec<Row> {
    vec![
        Row::pending(
            "P5",
            "tower layer, 32 concurrent requests on one hot key",
            "≥ 40 % of the P1 pair rate",
            WHY,
        ),
        Row::pending(
            "P6",
            "tower layer, 32 concurrent requests on distinct keys",
            "≥ 70 % of the service with the floor by hand",
            WHY,
        ),
    ]
}
