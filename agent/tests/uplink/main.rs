//! The uplink over MQTT. One test binary for the area.

mod broker;
