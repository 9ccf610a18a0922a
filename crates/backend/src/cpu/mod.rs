//! CPU reference backend (being written).
