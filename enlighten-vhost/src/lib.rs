//! The enlightenment device (see `virtio-devices::enlighten`) served to QEMU
//! as a vhost-user backend. Work in progress (issue 3).
