//! virtio devices: placeholder, being written.
