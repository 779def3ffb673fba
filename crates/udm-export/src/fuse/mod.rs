//! FUSE file export (in progress).
