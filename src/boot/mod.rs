//! Guest loading: placeholder, being written.
