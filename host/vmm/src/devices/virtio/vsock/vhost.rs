//! vhost placeholder
