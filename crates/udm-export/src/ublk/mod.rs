//! ublk export (in progress).
