package cow

// SetIdentityLayers makes the layers created from now on use the identity
// format (the format before dense layers: block b at byte b*BlockSize of a
// sparse file) or not, and returns the previous setting.
func SetIdentityLayers(on bool) bool { return identityLayers.Swap(on) }
