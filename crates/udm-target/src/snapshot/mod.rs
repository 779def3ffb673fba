//! Snapshots: snapshot-origin, snapshot, snapshot-merge (in progress).
