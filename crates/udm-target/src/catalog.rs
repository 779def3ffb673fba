//! The catalog of target types by name, as the kernel's `dm_register_target` list: what
//! `Table::build` looks names up in and what `udmsetup targets` prints. (Not udm-core's
//! device registry.)

use std::sync::Arc;

use udm_types::Errno;

use crate::target::{TargetError, TargetType};

/// The known target types. Cheap to clone (types are shared).
#[derive(Clone, Default)]
pub struct TargetCatalog {
    /// In registration order.
    types: Vec<Arc<dyn TargetType>>,
}

impl std::fmt::Debug for TargetCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.types.iter().map(|t| t.name()))
            .finish()
    }
}

impl TargetCatalog {
    /// An empty catalog (tests, embedders that want a restricted set).
    pub fn new() -> Self {
        Self::default()
    }

    /// Every target udm implements: error, linear, striped, zero, delay, flakey, era and the
    /// snapshot family.
    pub fn with_builtins() -> Self {
        let mut reg = Self::new();
        reg.register(Arc::new(crate::error_target::ErrorType));
        reg.register(Arc::new(crate::linear::LinearType));
        reg.register(Arc::new(crate::striped::StripedType));
        reg.register(Arc::new(crate::zero::ZeroType));
        reg.register(Arc::new(crate::delay::DelayType));
        reg.register(Arc::new(crate::flakey::FlakeyType));
        reg.register(Arc::new(crate::era::EraType));
        reg.register(Arc::new(crate::snapshot::origin::OriginType));
        reg.register(Arc::new(crate::snapshot::snap::SnapshotType {
            merge: false,
        }));
        reg.register(Arc::new(crate::snapshot::snap::SnapshotType {
            merge: true,
        }));
        reg
    }

    /// Registers `ty`, replacing a type of the same name.
    pub fn register(&mut self, ty: Arc<dyn TargetType>) {
        self.types.retain(|t| t.name() != ty.name());
        self.types.push(ty);
    }

    /// Registers `ty`; EEXIST if the name is taken (the kernel's `dm_register_target`).
    pub fn try_register(&mut self, ty: Arc<dyn TargetType>) -> Result<(), TargetError> {
        if self.get(ty.name()).is_some() {
            return Err(TargetError::new(
                Errno::EEXIST,
                format!("'{}' target already registered", ty.name()),
            ));
        }
        self.types.push(ty);
        Ok(())
    }

    /// The type named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn TargetType>> {
        self.types.iter().find(|t| t.name() == name).cloned()
    }

    /// Names and versions, most recently registered first (the kernel's list order, which
    /// `dmsetup targets` prints).
    pub fn list(&self) -> Vec<(String, [u32; 3])> {
        self.types
            .iter()
            .rev()
            .map(|t| (t.name().to_string(), t.version()))
            .collect()
    }

    /// `dmsetup targets` output: `%-16s v%d.%d.%d` per type.
    pub fn format_targets(&self) -> String {
        self.list()
            .iter()
            .map(|(n, v)| format!("{n:<16} v{}.{}.{}\n", v[0], v[1], v[2]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_have_kernel_versions() {
        let reg = TargetCatalog::with_builtins();
        let list = reg.list();
        let v = |n: &str| list.iter().find(|(x, _)| x == n).map(|(_, v)| *v);
        assert_eq!(v("linear"), Some([1, 5, 0]));
        assert_eq!(v("striped"), Some([1, 7, 0]));
        assert_eq!(v("zero"), Some([1, 2, 0]));
        assert_eq!(v("error"), Some([1, 7, 0]));
        assert_eq!(v("delay"), Some([1, 5, 0]));
        assert_eq!(v("flakey"), Some([1, 5, 0]));
        assert_eq!(v("era"), Some([1, 0, 0]));
        assert!(v("snapshot").is_some() && v("snapshot-origin").is_some());
        assert!(reg.format_targets().contains("linear           v1.5.0\n"));
        let mut reg2 = reg.clone();
        let e = reg2
            .try_register(Arc::new(crate::zero::ZeroType))
            .unwrap_err();
        assert_eq!(e.errno, Errno::EEXIST);
    }
}
