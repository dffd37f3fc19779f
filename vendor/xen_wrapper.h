/* Headers the Xen blkif backend needs; bindgen reads this (see build.rs). */
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>
#include <xenstore.h>
#include <xengnttab.h>
#include <xenevtchn.h>
