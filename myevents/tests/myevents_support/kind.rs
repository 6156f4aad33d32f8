//! The two MyEvents binaries, as tests and benches start them (one file,
//! included by both with `#[path]`).

/// The two MyEvents binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Events,
    Booking,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Booking => "booking",
        }
    }

    /// The binary cargo built for this test or bench.
    pub fn exe(self) -> &'static str {
        match self {
            Kind::Events => env!("CARGO_BIN_EXE_events"),
            Kind::Booking => env!("CARGO_BIN_EXE_booking"),
        }
    }
}
