//! Serial console: placeholder, being written.
