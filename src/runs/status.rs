//! Run status ordering: a run's status only ever moves forward.

/// Where a status sits in a run's life. Nen documents `processing`, then `success` or `failed`;
/// its tooling also uses `timeout`, so any status other than `submitted` and `processing` is
/// treated as terminal rather than rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatusRank {
    Submitted = 0,
    Processing = 1,
    Terminal = 2,
}

impl StatusRank {
    pub fn of(status: &str) -> Self {
        match status {
            "submitted" => StatusRank::Submitted,
            "processing" => StatusRank::Processing,
            _ => StatusRank::Terminal,
        }
    }

    pub fn is_terminal(self) -> bool {
        self == StatusRank::Terminal
    }

    pub fn as_i16(self) -> i16 {
        self as i16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_order_submitted_processing_terminal() {
        assert!(StatusRank::of("submitted") < StatusRank::of("processing"));
        assert!(StatusRank::of("processing") < StatusRank::of("success"));
        assert_eq!(StatusRank::of("failed"), StatusRank::Terminal);
        assert_eq!(StatusRank::of("timeout"), StatusRank::Terminal);
        assert_eq!(StatusRank::of("Processing"), StatusRank::Terminal);
    }
}
