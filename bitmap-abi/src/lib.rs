//! Guest/host ABI of the enlightenment device (free and priority bitmaps).
//! Filled in by the guest-module issue.
#![no_std]
