//! Hand-off (being written).
