//! Fork children: making a lock of the parent's usable again.
//!
//! No state. Only for the fork child's single thread (`os.register_at_fork`
//! `after_in_child`), before anything else locks; nothing here runs in
//! signal context.

use std::sync::Mutex;

/// Makes `lock` usable in a fork child. A thread that held it in the
/// parent does not exist here and never lets go: the lock is replaced by a
/// fresh one and what it guarded is forgotten (leaked, never dropped: it
/// may be half-changed). Returns false when that happened.
///
/// Only for the fork child's single thread, before anything else locks it.
pub fn reset_in_child<T>(lock: &'static Mutex<Option<T>>) -> bool {
    match lock.try_lock() {
        Ok(_) | Err(std::sync::TryLockError::Poisoned(_)) => true,
        Err(std::sync::TryLockError::WouldBlock) => {
            // SAFETY: the child has one thread, this one, and it holds no
            // guard of `lock`; the old lock and its contents are forgotten
            // without being dropped. Every field of a `Mutex` is interior-
            // mutable, so writing it through the static's address is what
            // any lock operation does.
            unsafe {
                std::ptr::write(
                    std::ptr::addr_of!(*lock) as *mut Mutex<Option<T>>,
                    Mutex::new(None),
                )
            };
            false
        }
    }
}
