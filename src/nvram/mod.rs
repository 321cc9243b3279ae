//! NVRAM image: placeholder, being written.
