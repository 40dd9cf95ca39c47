//! A polling virtio-mmio (version 2) driver with one split virtqueue.
