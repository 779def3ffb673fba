//! io_uring engine (in progress).
