//! udm-qcow2 on an arbitrary image: parsing the header and L1 table, walking every allocated
//! cluster and reading a few clusters must give errors, never panic, hang or allocate from
//! unchecked header values.
#![no_main]
use udm_qcow2::{Cluster, Image};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(img) = Image::from_reader(data.to_vec(), "fuzz.qcow2") else { return };
    let _ = (img.size(), img.backing(), img.backing_format());
    let mut buf = vec![0u8; img.cluster_size() as usize];
    if let Ok(all) = img.allocated() {
        for (c, state) in all.iter().take(64) {
            if matches!(state, Cluster::Data { .. }) {
                let _ = img.read_cluster(*c, &mut buf);
            }
        }
    }
    let n = img.nb_clusters();
    for c in [0, 1, n / 2, n.saturating_sub(1), n, u64::MAX] {
        if img.cluster(c).is_ok() {
            let _ = img.read_cluster(c, &mut buf);
        }
    }
});
