//! VM builder and run loop: placeholder, being written.
