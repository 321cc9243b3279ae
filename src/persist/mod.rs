//! Machine state: placeholder, being written.
